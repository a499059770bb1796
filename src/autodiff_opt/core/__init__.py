"""The leaf core: the genome, the user errors, the storage attribute keys. Imports nothing of ours."""
