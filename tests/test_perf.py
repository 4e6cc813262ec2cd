"""Performance levers (ddpmlab.perf) and the benchmark scripts (bench/), on the CPU; GPU-only checks skip.

Throughput itself is never asserted here (that is the benches' job, on a GPU); these tests pin what the levers
must not change (keys, outputs, the CPU default) and what they must remove (host syncs between steps)."""

from __future__ import annotations

import copy
import functools
import itertools
import sys

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from conftest import REPO, TINY, compose_cfg
from ddpmlab.api import build_module
from ddpmlab.errors import ConfigError
from ddpmlab.lit.ema import ema_multi_avg_fn
from ddpmlab.perf import apply_perf, autocast, prepare_sampling, resolve, sampling_precision, with_fused
from ddpmlab.samplers import Sampler, generate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL_ON = {
    "compile": True,
    "compile_backend": "eager",
    "channels_last": True,
    "fused_optimizer": True,
    "sync_free_logging": True,
}


@pytest.fixture
def tiny_cfg(tmp_path):
    return compose_cfg("train", TINY + ["data.batch_size=8"], tmp_path / "run")


def conv_weights(net):
    return [p for p in net.parameters() if p.ndim == 4]


def test_switches_resolve_per_device_and_reject_nonsense():
    assert resolve("compile", "auto", on_gpu=True) and not resolve("compile", "auto", on_gpu=False)
    assert resolve("tf32", True, on_gpu=False) and not resolve("tf32", False, on_gpu=True)
    with pytest.raises(ConfigError, match="perf.compile='yes'.*true, false or auto"):
        resolve("compile", "yes", on_gpu=True)
    with pytest.raises(ConfigError, match=r"unknown perf setting\(s\) \['compiel'\]"):
        apply_perf(object(), "cpu", {"compiel": True})
    with pytest.raises(ConfigError, match="precision='fp16'"):
        autocast("cpu", "fp16")


def test_cpu_default_is_the_plain_fp32_eager_path(tiny_cfg):
    module = build_module(tiny_cfg)
    factory = module.optimizer_factory
    on = apply_perf(module, "cpu", tiny_cfg.perf)  # perf=auto, as train.py calls it
    assert tiny_cfg.perf.compile == "auto" and not any(on.values())
    net = module.denoiser.net
    assert net._compiled_call_impl is None and all(w.is_contiguous() for w in conv_weights(net))
    assert module.optimizer_factory is factory and module.loss_in_progress_bar
    assert not module.build_optimizer().param_groups[0]["fused"]


def test_sampling_levers_are_shared_and_the_cpu_sampling_path_is_fp32_eager(tiny_cfg):
    module = build_module(tiny_cfg)
    apply_perf(module, "cpu", tiny_cfg.perf)
    assert module.sampling_perf == dict(tiny_cfg.perf.sampling)  # what the grid / chain / FID callbacks use
    from ddpmlab.callbacks.utils import sampling_perf

    ema_copy = copy.deepcopy(module.denoiser)
    assert sampling_perf(module, ema_copy) == module.sampling_perf
    assert sampling_perf(module, module.denoiser) == {**module.sampling_perf, "compile": False}  # never the trained net
    assert compose_cfg("sample", ["ckpt_path=x"], None).perf.sampling == tiny_cfg.perf.sampling  # one config
    den = module.denoiser.eval()
    sampler = Sampler("ddim", 5, eta=0.5)
    plain = generate(den, sampler, 3, seed=1, batch_size=2)
    levered = generate(den, sampler, 3, seed=1, batch_size=2, perf=module.sampling_perf)
    assert torch.equal(plain, levered)  # auto: nothing on for the CPU, fp32
    assert den.net._compiled_call_impl is None and all(w.is_contiguous() for w in conv_weights(den.net))
    assert sampling_precision("auto", "cpu") == "fp32" and sampling_precision("auto", "cuda") == "bf16"
    with pytest.raises(ConfigError, match="precision='fp16'"):
        sampling_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match=r"unknown perf setting\(s\) \['fused_optimizer'\]"):
        prepare_sampling(den.net, "cpu", {"fused_optimizer": True})
    prepare_sampling(den.net, "cpu", {"compile": True, "compile_backend": "eager"})
    compiled = den.net._compiled_call_impl
    prepare_sampling(den.net, "cpu", {"compile": True, "compile_backend": "eager"})  # again: nothing recompiles
    assert compiled is not None and den.net._compiled_call_impl is compiled


def test_levers_keep_checkpoint_keys_outputs_and_ema_copies_honest(tiny_cfg):
    module = build_module(tiny_cfg)
    reference = copy.deepcopy(module.denoiser.net)  # uncompiled, NCHW, same weights
    on = apply_perf(module, "cpu", ALL_ON)
    net = module.denoiser.net
    assert all(v for k, v in on.items() if k != "tf32") and not on["tf32"]  # TF32 is global state: left to the GPU test
    assert net._compiled_call_impl is not None and all(
        w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(net)
    )
    # in-place compile: the same parameter names (no _orig_mod.), loadable into a plain network
    assert list(net.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(net.state_dict(), strict=True)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 49])
    torch.testing.assert_close(net(x, t), reference(x, t), rtol=1e-5, atol=1e-5)
    # the EMA callback deep-copies the module: the copy must run its own weights, not the compiled original's
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    assert twin(x, t).abs().max() == 0 and net(x, t).abs().max() > 0
    opt = module.build_optimizer()
    assert opt.param_groups[0]["fused"] is True and not module.loss_in_progress_bar


def test_fused_is_added_only_where_the_optimizer_has_it_and_the_config_left_it_open():
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    assert with_fused(adam).keywords["fused"] is True
    decided = functools.partial(torch.optim.Adam, lr=1e-3, fused=False)
    assert with_fused(decided) is decided
    lbfgs = functools.partial(torch.optim.LBFGS, lr=1.0)  # no fused kernel
    assert with_fused(lbfgs) is lbfgs


def test_ema_update_copies_first_then_averages_on_the_device():
    avg, cur = [torch.zeros(3)], [torch.tensor([1.0, 2.0, 3.0])]
    ema_multi_avg_fn(0.9, warmup=False)(avg, cur, torch.tensor(0))  # first update: a copy
    torch.testing.assert_close(avg[0], cur[0], rtol=0, atol=0)
    ema_multi_avg_fn(0.9, warmup=False)(avg, [torch.zeros(3)], torch.tensor(1))
    torch.testing.assert_close(avg[0], 0.9 * cur[0])
    avg = [torch.ones(3)]
    ema_multi_avg_fn(0.999, warmup=True)(avg, [torch.zeros(3)], torch.tensor(2))  # warm-up decay (1+n)/(10+n)
    torch.testing.assert_close(avg[0], torch.full((3,), 3 / 12))


class HostSyncs:
    """Counts the calls that copy a tensor's value to the host (on a GPU each is a sync that drains the queue)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        self.count = 0

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, orig in self.saved.items():

            def counted(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, orig)


def test_trainer_steps_make_no_host_syncs_with_ema_bf16_and_fused_adam(tiny_cfg):
    """Between two logging steps a training step (forward, backward, clipping, fused Adam, EMA update, progress
    bar) must not read any device value on the host. bf16-mixed with clipping also proves that the fused
    optimizer is accepted (Lightning alone refuses it) and that its gradients are clipped."""
    module = build_module(tiny_cfg)
    apply_perf(module, "cpu", {"fused_optimizer": True, "sync_free_logging": True})
    syncs = HostSyncs()
    per_step: list[int] = []
    clipped_norms: list[torch.Tensor] = []  # the gradient norm the optimizer stepped with (device tensors;
    # a post-hook, because Lightning computes the gradients in a closure inside step())

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            grads = lambda opt: [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            trainer.optimizers[0].register_step_post_hook(
                lambda opt, a, k: clipped_norms.append(torch.nn.utils.get_total_norm(grads(opt)))
            )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            per_step.append(syncs.count)

    trainer = pl.Trainer(
        max_steps=6,
        precision="bf16-mixed",
        gradient_clip_val=1e-3,
        log_every_n_steps=100,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=False,
        accelerator="cpu",
        callbacks=[instantiate(tiny_cfg.ema), Record()],  # the progress bar stays on
    )
    loader = instantiate(tiny_cfg.data)
    with syncs:
        trainer.fit(module, datamodule=loader)
    assert trainer.global_step == 6
    steady = [b - a for a, b in itertools.pairwise(per_step[1:])]  # steps 2..5: no start-up, no logging
    assert steady == [0, 0, 0, 0], per_step
    ema = next(cb for cb in trainer.callbacks if type(cb).__name__ == "EMA")
    assert int(ema._average_model.n_averaged) == 6
    assert module.trainer.optimizers[0].param_groups[0]["fused"] is True
    torch.testing.assert_close(torch.stack(clipped_norms), torch.full((6,), 1e-3), rtol=1e-3, atol=0)


def load_bench(name: str):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


TINY_BENCH = [
    "--model",
    "unet_tiny",
    "--image-size",
    "8",
    "--channels",
    "1",
    "--peer-channels",
    "32,32",
    "--peer-groups",
    "8",
]
RATE_KEYS = {"img_per_s", "step_ms", "achieved_TFLOPs", "mfu", "peak_mem_GiB", "seconds"}


def test_train_bench_prints_json_for_trainer_bare_and_peer(capsys):
    pytest.importorskip("diffusers")
    out = load_bench("train_throughput").main(
        TINY_BENCH + ["--batch-size", "4", "--steps", "1", "--warmup", "0", "--profile-steps", "1"]
    )
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("{") and '"bench": "train"' in printed
    assert {"env", "config", "flops", "levers", "trainer", "bare", "peer", "ratio"} <= set(out)
    for path in ("trainer", "bare", "peer"):
        assert RATE_KEYS <= set(out[path]) and out[path]["img_per_s"] > 0 and out[path]["ema"]
    assert out["bare"]["profile"]["top_ops"] and out["bare"]["profile"]["wall_ms_per_step"] > 0
    assert out["config"]["precision"] == "fp32" and out["config"]["trainer_preset"] == "default"
    assert not any(out["levers"].values())  # the CPU default
    f = out["flops"]
    assert f["train_GFLOP_per_image"]["ddpmlab"] == pytest.approx(3 * f["forward_GFLOP_per_image"]["ddpmlab"], rel=1e-3)
    assert out["ratio"]["trainer_vs_peer"] == pytest.approx(
        out["trainer"]["img_per_s"] / out["peer"]["img_per_s"], rel=1e-2
    )


def test_sample_bench_prints_json_for_ddpmlab_and_peer(capsys):
    pytest.importorskip("diffusers")
    out = load_bench("sample_throughput").main(TINY_BENCH + ["--batch-size", "2", "--num-steps", "3", "--runs", "1"])
    assert '"bench": "sample"' in capsys.readouterr().out.strip().splitlines()[-1]
    for path in ("ddpmlab", "peer"):
        assert RATE_KEYS <= set(out[path]) and out[path]["img_per_s"] > 0 and out[path]["finite"]
    assert out["ddpmlab"]["network_calls_per_image"] == 3 and "ddim" in out["ddpmlab"]["sampler"]
    assert out["flops"]["sample_GFLOP_per_image"]["ddpmlab"] == pytest.approx(
        3 * out["flops"]["forward_GFLOP_per_image"]["ddpmlab"], rel=1e-3
    )


def test_flop_count_matches_the_papers_cifar10_network():
    """36.6 GFLOP per training image (3 x forward) for the 35.7M DDPM CIFAR-10 network: 12.2 GFLOP a forward pass."""
    C = load_bench("common")
    from ddpmlab.networks import UNet

    fwd = C.forward_flops(UNet, (3, 32, 32))
    assert C.params_millions(UNet) == pytest.approx(35.746, abs=1e-3)
    assert 3 * fwd / 1e9 == pytest.approx(36.6, rel=0.03)


def test_gpu_fast_preset_is_bf16_and_keeps_the_default_trainer(tmp_path):
    cfg = compose_cfg("train", ["trainer=gpu_fast"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.benchmark is True
    assert (
        cfg.trainer.gradient_clip_val == 1.0
        and cfg.trainer.max_steps == compose_cfg("train", [], tmp_path).trainer.max_steps
    )


@cuda
@pytest.mark.gpu
def test_gpu_auto_turns_every_lever_on_and_compiled_sampling_matches_eager(tiny_cfg):
    module = build_module(tiny_cfg)
    on = apply_perf(module, "cuda", {"compile_backend": "inductor"})
    assert all(on.values())
    from ddpmlab.api import build_denoiser

    eager = build_denoiser(tiny_cfg).cuda().eval()
    fast = copy.deepcopy(eager)
    sampler = instantiate(tiny_cfg.sampler).with_steps(10)
    expected = generate(eager, sampler, 16, seed=0)
    perf = {**tiny_cfg.perf.sampling, "precision": "fp32"}  # channels_last + reduce-overhead (CUDA graphs), TF32
    for _ in range(2):  # the second call replays the captured graphs
        got = generate(fast, sampler, 16, seed=0, perf=perf)
    assert fast.net._compiled_call_impl is not None
    bf16 = generate(copy.deepcopy(eager), sampler, 16, seed=0, perf=dict(tiny_cfg.perf.sampling))  # auto: bf16
    assert torch.isfinite(bf16).all() and (bf16 - expected).abs().mean() < 0.05
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
