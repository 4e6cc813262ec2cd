import subprocess
import sys


def test_pure_packages_import_neither_lightning_nor_hydra():
    code = (
        "import sys, ddpmlab.diffusion, ddpmlab.objectives, ddpmlab.samplers, ddpmlab.networks\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
