# Source me on a GPU machine that cannot download (see bench/README.md): installs the wheels copied into
# .whl (hydra-core, omegaconf, antlr4, diffusers, importlib-metadata, torch-fidelity) and ddpmlab itself.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD/src:$PYTHONPATH
python3 -c "import torch, lightning, hydra, diffusers, ddpmlab; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
