from autodiff_opt.cli import main

main()
