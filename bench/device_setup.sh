# Source me on a fresh GPU machine that cannot download, for runs by hand beside bench/gpu_check.sh (which does
# this itself): installs the wheels that bench/prepare_device.sh put in .gpu_check/wheels (hydra-core, omegaconf,
# antlr4, diffusers, torch-fidelity) and ddpmlab itself.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_check/wheels/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD/src:$PYTHONPATH
python3 -c "import torch, lightning, hydra, diffusers, ddpmlab
print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
