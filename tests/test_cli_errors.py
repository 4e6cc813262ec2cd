"""Bad input on the command line: one short, clear line on stderr, exit status 2, no traceback."""

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    "args,expected",
    [
        (["schedule=linear", "schedule.beta_end=1.5"], "beta_end=1.5 is outside (0, 1)"),
        (["schedule.zero_terminal_snr=true"], "eps-prediction cannot recover x0"),
        (["model.channel_mult=[1,2,2,2,2]"], "image_size=8 cannot go through this U-Net"),
        (["data=mnist", "data.root=/nonexistent/place"], "MNIST not found: looked in /nonexistent/place/MNIST/raw"),
    ],
)
def test_train_cli_reports_bad_input_clearly(tmp_path, args, expected):
    r = run_cli(
        "train.py", *args, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("ddpmlab: error:") or "ddpmlab: error:" in r.stderr


def test_sample_cli_reports_missing_checkpoint(tmp_path):
    r = run_cli(
        "sample.py", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path / 'o'}", cwd=tmp_path, timeout=120
    )
    assert r.returncode == 2 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr
