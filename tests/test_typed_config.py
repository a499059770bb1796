"""The typed config (issue 21): the composed config becomes ``config.Config`` once (OmegaConf.to_object on the
structured schema), what cannot become one is a one-line ConfigError (exit 2), and the study's name, its
signature and the report's settings are the same whether computed from the typed Config or the composed tree
(so a study made before this change still resumes under its name)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from autodiff_opt.config import Config, FinalConfig, SearchConfig, Stage2Config, as_tree, to_config
from autodiff_opt.core.errors import USER_ERRORS, ConfigError
from cli_helpers import compose_cfg


def test_the_composed_config_becomes_the_typed_config(tmp_path: Path) -> None:
    cfg = compose_cfg(["search.num_steps=6", "search.stage2.enabled=true", "final.repeats=2"], tmp_path)
    config = to_config(cfg)
    assert isinstance(config, Config) and to_config(config) is config
    assert isinstance(config.search, SearchConfig) and isinstance(config.search.stage2, Stage2Config)
    assert isinstance(config.final, FinalConfig)
    assert (config.search.num_steps, config.search.stage2.enabled, config.final.repeats) == (6, True, 2)
    assert config.output_dir == str(tmp_path) and "${" not in config.cache_dir  # interpolations resolved once
    assert as_tree(config) == cfg  # and back (the benchmarks in experiments/ update a DictConfig copy)


def test_the_report_settings_hide_the_storage_password(tmp_path: Path) -> None:
    from autodiff_opt.report.provenance import settings_yaml

    text = settings_yaml(to_config(compose_cfg(["storage.url=postgresql://me:s3cret@127.0.0.1:5/db"], tmp_path)))
    assert "postgresql://***@127.0.0.1:5/db" in text and "s3cret" not in text


@pytest.mark.parametrize("tree,key", [
    ({"search": {"num_steps": "four"}}, "search.num_steps"),  # a wrong type
    ({"search": {"num_stepz": 4}}, "search.num_stepz"),  # a key the schema lacks
    ({"output_dir": "x", "cache_dir": "${oc.env:AUTODIFF_OPT_NO_SUCH_VARIABLE}"}, "cache_dir"),  # does not resolve
])
def test_what_cannot_be_typed_is_one_config_error_line(tree: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        to_config(OmegaConf.create(tree))
    message = str(err.value)
    assert isinstance(err.value, USER_ERRORS) and "\n" not in message and message.startswith(f"{key}: ")


def test_a_missing_value_is_one_config_error_line() -> None:
    composed = OmegaConf.structured(Config)  # a value left ??? in the composed tree
    composed.output_dir, composed.final.seed = "x", "???"
    with pytest.raises(ConfigError, match=r"^final\.seed: .*missing mandatory value") as err:
        to_config(composed)
    assert "\n" not in str(err.value)


def test_the_runner_refuses_an_unresolvable_setting_before_any_work(tmp_path: Path) -> None:
    from autodiff_opt.runner import prepare_study

    db = tmp_path / "never.db"
    cfg = compose_cfg([f"storage.url=sqlite:///{db}", "cache_dir=${oc.env:AUTODIFF_OPT_NO_SUCH_VARIABLE}"], tmp_path)
    with pytest.raises(ConfigError, match=r"^cache_dir: .*AUTODIFF_OPT_NO_SUCH_VARIABLE"):
        prepare_study(cfg)
    assert not db.exists()  # refused before the storage was opened


def _experiments() -> list[str]:
    from autodiff_opt import CONFIG_DIR

    return sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def test_names_signatures_and_settings_are_those_of_the_composed_tree(tmp_path: Path) -> None:
    """Every shipped experiment (and stage 2, the solver gene): what a resume compares and the report shows."""
    from autodiff_opt.report.provenance import settings_yaml
    from autodiff_opt.runner import config_signature, study_name_of

    cases = [[], ["search.stage2.enabled=true"], ["search.solvers=[ddim,unipc]"],
             *[[f"+experiment={name}"] for name in _experiments()]]
    for overrides in cases:
        cfg = compose_cfg(overrides, tmp_path)
        config = to_config(cfg)
        assert config_signature(config) == config_signature(cfg), overrides
        assert study_name_of(config) == study_name_of(cfg), overrides
        assert settings_yaml(config) == OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)), overrides
