"""The runtime demo (the README's main command until the GRPO app lands) runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.demo.main import main
from forge.config import ConfigError


def test_demo_runs_and_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--steps", "4", "--run_dir", str(tmp_path), "--metric_logging.console.enabled", "false"])
    files = list(tmp_path.glob("*/metrics.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["generator/generate/sum_samples"] == 32 for r in rows)  # recorded inside actors
    assert all(r["generator/update/count"] == 2 for r in rows)  # fanout reached both replicas
    assert rows[-1]["reward/mean"] > rows[0]["reward/mean"]  # the toy policy improves
    assert "reward/mean" in capsys.readouterr().out


def test_demo_config_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        main(["--stpes", "3"])
    with pytest.raises(ConfigError, match=r"'provisioner' must be one of \['local', 'monarch'\], got 'ray' \(or null\)"):
        main(["--provisioner", "ray"])
