"""The ablation's arms and its table, read from runs' metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.ablation import SCREEN_STEPS, arms, choose, gap_closed, main, references, summarize
from trainer.config import PRESETS, parse_field, preset_config


def test_every_arm_is_a_valid_config_and_both_learners_get_the_same_value_options() -> None:
    by_family: dict[tuple[str, str], set[str]] = {}
    for arm in arms():
        preset_config(arm.preset, dict(arm.sets))  # refused here if the arm contradicted itself
        by_family.setdefault((arm.family, arm.learner), set()).add(arm.option)
    for family in ("halfcheetah-vel", "ant-dir"):
        trmrl, rl2 = by_family[family, "trmrl"], by_family[family, "rl2"]
        value = {o for o in trmrl if o == "base" or o.startswith("value-")}
        assert value == {o for o in rl2 if o == "base" or o.startswith("value-")}
        assert {"base", "value-memory-popart", "value-detached", "value-encoder"} <= value
        assert len(trmrl) == len(rl2)  # as many tuning runs for one learner as for the other
    assert {"prenorm", "window25", "context-trial"} <= by_family["halfcheetah-vel", "trmrl"]
    assert {"rnn256", "bptt200", "bptt400", "episode-scope"} <= by_family["halfcheetah-vel", "rl2"]
    # On ant-dir too, the trial-long context (the memory the trial issue adds) beside RL²'s whole trial.
    assert {"prenorm", "context-trial"} <= by_family["ant-dir", "trmrl"]
    assert {"rnn256", "bptt400"} <= by_family["ant-dir", "rl2"]
    names = [a.name for a in arms()]
    assert len(names) == len(set(names))


def test_the_table_reads_validation_figures_and_the_gap_from_the_shipped_references(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    memoryless, oracle = references("halfcheetah-vel")
    run = tmp_path / "halfcheetah-vel-trmrl-base"
    run.mkdir()
    span = oracle - memoryless
    values = [memoryless + f * span for f in (0.2, 0.5, 0.9, 0.8, 1.0)]
    timing = {"time/sample_s": 6.0, "time/update_s": 6.0}
    lines = [
        {"update": i, "steps": 100_000 * (i + 1), **timing, "validation/return": v}
        for i, v in enumerate(values)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out, png = tmp_path / "table.json", tmp_path / "screen.png"
    assert main(["table", str(tmp_path), "--json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = json.loads(out.read_text())["rows"]
    assert row["gap_closed"] == pytest.approx(0.9)  # the mean of the last three: 0.9, 0.8, 1.0
    assert row["steps_to_gap_085"] == 300_000 and row["steps"] == 500_000
    assert row["train_seconds"] == pytest.approx(60.0)
    assert "| halfcheetah-vel | trmrl | base | 0.50 M |" in capsys.readouterr().out
    assert json.loads(out.read_text())["screen_steps"] == SCREEN_STEPS


def test_a_table_of_no_runs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["table", str(tmp_path / "missing")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["table", str(tmp_path)])


def test_run_trains_only_what_is_not_finished_and_refuses_unknown_arms(tmp_path: Path) -> None:
    (tmp_path / "halfcheetah-vel-trmrl-base" / "final").mkdir(parents=True)
    # A finished arm is not trained again.
    assert main(["run", "--runs", str(tmp_path), "--only", "halfcheetah-vel-trmrl-base"]) == 0
    assert not (tmp_path / "halfcheetah-vel-trmrl-base.log").exists()
    for bad in (["--only", "halfcheetah-vel-trmrl-nothing"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["run", "--runs", str(tmp_path), *bad])
        assert exc.value.code == 2


def _finished(runs: Path, name: str, value: float, steps: int = SCREEN_STEPS) -> None:
    run = runs / name
    run.mkdir(parents=True, exist_ok=True)
    lines = [{"update": i, "steps": steps // 3 * (i + 1), "validation/return": value} for i in range(3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_final_takes_each_learners_best_validation_arm_once_its_screen_is_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    screen = tmp_path / "screen"
    family = [a for a in arms() if a.family == "halfcheetah-vel"]
    for arm in family:
        best = {"trmrl": "value-encoder", "rl2": "rnn256"}[arm.learner]
        _finished(screen, arm.name, -20.0 if arm.option == best else -40.0)
    # An unfinished RL² arm keeps RL² out of the choice (it might have been the best).
    _finished(screen, "halfcheetah-vel-rl2-bptt400", -10.0, steps=SCREEN_STEPS // 2)
    out = tmp_path / "final"
    argv = ["final", str(screen), "--runs", str(out), "--also", "context-trial", "--dry-run"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "halfcheetah-vel trmrl: value-encoder (validation -20.0)"
    commands = printed[1:]
    assert len(commands) == 6  # TrMRL's choice and its trial-long context, three seeds each
    assert all("--no-held-out" not in c and "--total-steps 3000000" in c for c in commands)
    assert {c.split("--seed ")[1].split()[0] for c in commands} == {"1", "2", "3"}
    assert sum("--set value_input=encoder" in c for c in commands) == 3
    assert sum("--set context=trial" in c for c in commands) == 3
    assert str(out / "halfcheetah-vel-trmrl-value-encoder-s2") in " ".join(commands)

    # With RL²'s last arm finished, RL² gets its choice too.
    _finished(screen, "halfcheetah-vel-rl2-bptt400", -41.0)
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "halfcheetah-vel rl2: rnn256 (validation -20.0)" in printed
    assert sum("--set rnn_hidden=256" in c for c in printed) == 3


def test_final_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    for bad in (
        [str(tmp_path / "missing")],
        [str(tmp_path)],  # no finished screen
        [str(tmp_path), "--also", "nothing"],
        [str(tmp_path), "--jobs", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(["final", *bad, "--dry-run"])
        assert exc.value.code == 2


def test_report_gives_each_final_arm_its_seeds_mean_spread_and_gap_on_every_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    memoryless, oracle = references("halfcheetah-vel", "test")
    span = oracle - memoryless
    for seed, share in ((1, 0.9), (2, 0.8), (3, 1.0)):
        _finished(tmp_path, f"halfcheetah-vel-trmrl-base-s{seed}", -30.0 - seed)
        held_out = {"test/return": memoryless + share * span, "ood/return": -100.0 - seed}
        with (tmp_path / f"halfcheetah-vel-trmrl-base-s{seed}" / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"update": 9, "steps": SCREEN_STEPS, **held_out}) + "\n")
    _finished(tmp_path, "halfcheetah-vel-rl2-base-s1", -20.0, steps=SCREEN_STEPS // 2)  # not finished
    out, png = tmp_path / "final.json", tmp_path / "final.png"
    assert main(["report", str(tmp_path), "--json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (row,) = json.loads(out.read_text())["rows"]
    assert row["arm"] == "halfcheetah-vel-trmrl-base" and row["seeds"] == [1, 2, 3]
    test = row["splits"]["test"]
    assert test["gap_closed"] == pytest.approx(0.9) and test["worst_gap_closed"] == pytest.approx(0.8)
    assert row["splits"]["validation"]["mean"] == pytest.approx(-32.0)
    assert row["splits"]["ood"]["per_seed"] == [-101.0, -102.0, -103.0]
    printed = capsys.readouterr().out
    assert "| halfcheetah-vel | trmrl | base | 1,2,3 | -32.0 ± 0.8 (" in printed
    assert "rl2" not in printed  # its one run has not finished the budget
    # Where the references nearly coincide (ant-dir's sideways ood tasks), no share of the gap is given.
    assert gap_closed("ant-dir", "ood", 200.0) is None and gap_closed("ant-dir", "test", 886.7) is not None
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "empty")])
    assert exc.value.code == 2


def test_the_chosen_presets_carry_the_screens_validation_choice() -> None:
    """``<preset>-chosen`` and ``<preset>-rl2-chosen`` are the arms ``choose`` picks from the committed
    screen, and the paper-faithful presets they sit beside are unchanged by them."""
    screen = Path(__file__).resolve().parents[2] / "experiments" / "ablation"
    family = "halfcheetah-vel"
    rows = [r for a in arms() if a.family == family and (r := summarize(a, screen / a.name)) is not None]
    picks = choose(rows)
    assert set(picks) == {(family, "trmrl"), (family, "rl2")}  # the whole screen is committed
    for learner, name in (("trmrl", f"small-{family}-chosen"), ("rl2", f"small-{family}-rl2-chosen")):
        base = PRESETS[f"small-{family}" + ("-rl2" if learner == "rl2" else "")]
        sets = picks[family, learner]["sets"]
        assert sets  # the screen chose an option, not the preset itself
        expected = {**base, **{k: parse_field(k, v) for k, v in sets.items()}}
        assert PRESETS[name] == expected
        preset_config(name)  # a valid configuration
    assert PRESETS[f"small-{family}"]["value_input"] == "observation"
    assert "value_norm" not in PRESETS[f"small-{family}-rl2"]
