"""Settings, checkpoint discovery, model naming and start-up refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_support import make_checkpoint

from service.cli import main
from service.config import Settings, model_name
from service.lifecycle import load_models

pytestmark = pytest.mark.anyio


def test_settings_read_trmrl_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRMRL_MODELS", f"{tmp_path / 'a'}, {tmp_path / 'b'}")
    monkeypatch.setenv("TRMRL_API_KEYS", "k1,k2")
    monkeypatch.setenv("TRMRL_DEVICE", "cpu")
    monkeypatch.setenv("TRMRL_MAX_SESSIONS", "128")
    monkeypatch.setenv("TRMRL_SESSION_TTL_S", "2.5")
    monkeypatch.setenv("TRMRL_MAX_BATCH", "32")
    monkeypatch.setenv("TRMRL_BATCH_WAIT_MS", "0.5")
    monkeypatch.setenv("TRMRL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TRMRL_PORT", "9000")
    s = Settings()
    assert s.models == [tmp_path / "a", tmp_path / "b"]
    assert s.api_keys == ["k1", "k2"]
    assert (s.device, s.max_sessions, s.session_ttl_s, s.max_batch, s.batch_wait_ms) == (
        "cpu",
        128,
        2.5,
        32,
        0.5,
    )
    assert (s.state_dir, s.port) == (tmp_path / "state", 9000)


def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRMRL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        Settings()


def test_without_models_every_bundled_checkpoint_is_served_sorted_by_name(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "zeta")
    make_checkpoint(tmp_path / "alpha")
    (tmp_path / "notes").mkdir()  # not a checkpoint: no config.json
    s = Settings(checkpoints_dir=tmp_path)
    assert [p.name for p in s.checkpoint_paths()] == ["alpha", "zeta"]
    registry = load_models(s)
    assert list(registry.engines) == ["alpha", "zeta"]
    assert registry.default == "alpha"


def test_no_bundled_checkpoints_means_nothing_to_serve(tmp_path: Path) -> None:
    s = Settings(checkpoints_dir=tmp_path / "missing")
    assert s.checkpoint_paths() == []
    with pytest.raises(RuntimeError, match="no checkpoints to serve"):
        load_models(s)


def test_the_cli_names_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="checkpoint not found"):
        main(["--checkpoint", str(tmp_path / "absent")])


@pytest.mark.parametrize(
    ("path", "name"), [("/ck/point-nav", "point-nav"), ("/ck/cheetah.tar.gz", "cheetah"), ("/ck/x.tar", "x")]
)
def test_the_model_name_is_the_checkpoint_name(path: str, name: str) -> None:
    assert model_name(Path(path)) == name


def test_two_checkpoints_with_one_name_are_refused(tmp_path: Path) -> None:
    paths = [make_checkpoint(tmp_path / "one" / "point-nav"), make_checkpoint(tmp_path / "two" / "point-nav")]
    with pytest.raises(ValueError, match="both named 'point-nav'"):
        load_models(Settings(models=paths))


def test_two_checkpoints_with_one_name_are_refused_in_one_line_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = make_checkpoint(tmp_path / "a" / "final"), make_checkpoint(tmp_path / "b" / "final")
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(first), "--checkpoint", str(second)])
    message = str(exit_.value.code)
    assert message.startswith("trmrl-serve: two checkpoints are both named 'final'") and "\n" not in message
    assert "name=path" in message and str(first) in message and str(second) in message
    # Nothing was loaded or served, and both checkpoints are as they were.
    assert capsys.readouterr().out == ""
    assert (first / "config.json").is_file() and (second / "config.json").is_file()


def test_models_are_named_at_serve_time_with_name_equals_path(tmp_path: Path) -> None:
    first, second = make_checkpoint(tmp_path / "a" / "final"), make_checkpoint(tmp_path / "b" / "final")
    settings = Settings(models=[Path(f"fresh={first}"), Path(f"old={second}")])
    assert settings.named_checkpoints() == [("fresh", first), ("old", second)]
    assert settings.checkpoint_paths() == [first, second]
    registry = load_models(settings)
    assert list(registry.engines) == ["fresh", "old"] and registry.default == "fresh"
    # The environment variable takes the same form; a path with '=' in it but no name stays a path.
    assert Settings(models=f"x={first},{second}").named_checkpoints() == [("x", first), ("final", second)]  # type: ignore[arg-type]
    assert Settings(models=[Path("/data/run=3/final")]).named_checkpoints() == [
        ("final", Path("/data/run=3/final"))
    ]


def test_api_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("k3\n\n# a comment\n  k4  \n")
    s = Settings(api_keys=["k1", "k2"], api_keys_file=keys_file)
    assert s.load_api_keys() == ["k1", "k2", "k3", "k4"]


def test_structured_logs_carry_session_ids() -> None:
    import json
    import logging

    from service.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("trmrl.service", logging.INFO, __file__, 1, "session created", None, None)
    record.session_id = "abc123"
    record.model = "point-nav"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "session created" and entry["session_id"] == "abc123"
    assert entry["model"] == "point-nav" and entry["level"] == "info"
    assert TextFormatter().format(record).endswith("session created session_id=abc123 model=point-nav")
