"""Every option of every config group composes, and its object instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import compose_cfg
from ddpmlab.api import CONFIG_DIR, build_denoiser
from ddpmlab.stages import prepare_text

GROUPS_BUILT = {"model", "schedule", "objective", "sampler", "optimizer", "ema", "data"}


def has_optuna_sweeper() -> bool:
    import importlib.util

    return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


def options():
    # shared/: blocks composed by sample.yaml and evaluate.yaml, not a group of train.yaml; optuna: an optional extra
    skipped = {"hydra", "paths", "shared"} | (set() if has_optuna_sweeper() else {"hparams_search"})
    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name not in skipped):
        for f in sorted(group.glob("*.yaml")):
            yield group.name, f.stem


@pytest.mark.parametrize("group,option", list(options()))
def test_every_option_composes_and_instantiates(tmp_path, group, option):
    over = [f"{group}={option}"] if group != "experiment" else [f"experiment={option}"]
    if group == "text_encoder":  # captions to build the vocabulary from
        over += ["data=digit_pairs", "text_encoder.path=/no/such/clip"] if option == "clip" else ["data=digit_pairs"]
    cfg = prepare_text(compose_cfg("train", over, tmp_path))  # a learned encoder's vocabulary, from the captions
    if group == "text_encoder" and option == "clip":  # a real CLIP folder: tests/test_clip_text.py
        with pytest.raises(Exception, match="/no/such/clip"):
            build_denoiser(cfg)
        return
    if group == "text_encoder":
        assert build_denoiser(cfg).tokenizer is not None
    node = cfg.get(group) if group != "experiment" else None
    if group in GROUPS_BUILT and node:
        assert instantiate(node) is not None
    if group in ("logger", "callbacks") and node:
        for sub in node.values():
            assert instantiate(sub) is not None
    if group == "trainer":
        assert instantiate(node) is not None
    if group in ("model", "schedule", "experiment"):
        build_denoiser(cfg)


def test_default_train_config_is_the_documented_one(tmp_path):
    cfg = compose_cfg("train", [], tmp_path)
    assert cfg.data.name == "digits" and cfg.schedule._target_.endswith("cosine_betas")
    assert cfg.sampler.algorithm == "ddpm" and "CSVLogger" in cfg.logger.csv._target_
    assert cfg.trainer.accelerator == "auto"
    # the first run's recipe, train.yaml's own defaults: unet_digits, Adam 2e-3, 100 warm-up steps then a half cosine
    assert cfg.model.num_res_blocks == 1 and cfg.model.dropout == 0 and cfg.model.attn_resolutions == []
    assert cfg.optimizer.lr == 2e-3 and cfg.optimizer.lr_schedule == "cosine" and cfg.optimizer.lr_warmup_steps == 100
    assert cfg.trainer.max_steps == 1500
    # the command line wins over the recipe; another experiment replaces it as a whole
    assert compose_cfg("train", ["optimizer.lr=1e-3", "model=unet_small"], tmp_path).model.num_res_blocks == 2
    cond = compose_cfg("train", ["experiment=cond_digits"], tmp_path)
    assert cond.optimizer.lr == 1e-3 and cond.optimizer.lr_schedule == "constant" and cond.model.dropout == 0.1
    den = build_denoiser(cfg)
    assert den.prediction == "eps" and den.diffusion.T == 1000


def test_train_yaml_lists_the_defaults_in_force():
    # what train.yaml names is what python train.py composes: no experiment replaces a listed option behind it
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    listed = OmegaConf.load(Path(CONFIG_DIR) / "train.yaml")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    groups = [entry for entry in OmegaConf.to_container(listed.defaults) if isinstance(entry, dict)]
    assert len(groups) > 10
    for entry in groups:
        for group, option in entry.items():
            assert choices.get(group) == option, f"train.yaml lists {group}: {option}, in force: {choices.get(group)}"
    for key, value in listed.items():
        if key not in ("defaults", "hydra"):
            assert cfg[key] == value, f"train.yaml sets {key}: {value}, in force: {cfg[key]}"


def test_the_learning_rate_schedule_is_the_optimizers(tmp_path):
    from hydra.errors import ConfigCompositionException

    from ddpmlab.errors import ConfigError
    from ddpmlab.lit.module import optimizer_partial
    from ddpmlab.validate import check_train_config

    cfg = compose_cfg("train", ["optimizer=adamw", "optimizer.lr_warmup_steps=7"], tmp_path)
    assert cfg.optimizer.lr_warmup_steps == 7 and "lr_warmup_steps" not in cfg
    assert "lr_warmup_steps" not in optimizer_partial(cfg.optimizer).keywords  # torch's AdamW never sees it
    # the old top-level keys: Hydra refuses the override, and a config that adds them is refused before training
    with pytest.raises(ConfigCompositionException, match="lr_warmup_steps"):
        compose_cfg("train", ["lr_warmup_steps=100"], tmp_path)
    with pytest.raises(ConfigError, match=r"lr_schedule is optimizer\.lr_schedule now"):
        check_train_config(compose_cfg("train", ["+lr_schedule=cosine"], tmp_path))


def test_sample_config_composes(tmp_path):
    from ddpmlab.cli.sample import given

    cfg = compose_cfg("sample", ["ckpt_path=x.ckpt", "sampler=ddim"], tmp_path)
    assert given(cfg.sampler)["algorithm"] == "ddim" and "variance" not in given(cfg.sampler)
    assert cfg.perf.sampling.precision == "auto"


def test_sample_and_evaluate_compose_one_sampler_block_and_one_repaint_block(tmp_path):
    # conf/shared/: the checkpoint's sampler unless a key is given, and RePaint's keys, written once
    from omegaconf import OmegaConf

    shared = Path(CONFIG_DIR) / "shared"
    from_ckpt, repaint = (OmegaConf.load(shared / f"{n}.yaml") for n in ("sampler_from_checkpoint", "repaint"))
    sample = compose_cfg("sample", ["ckpt_path=x.ckpt", "inpaint.jump_length=3"], tmp_path)
    evaluate = compose_cfg("evaluate", ["ckpt_path=x.ckpt", "guided.sampler.eta=0.5"], tmp_path)
    assert sample.sampler == evaluate.fid.sampler == from_ckpt and OmegaConf.is_missing(sample.sampler, "algorithm")
    assert evaluate.guided.sampler.eta == 0.5 and OmegaConf.is_missing(evaluate.guided.sampler, "num_steps")
    assert sample.inpaint.jump_length == 3 and sample.inpaint.num_steps == repaint.num_steps == 250
    assert set(repaint) <= set(sample.inpaint) and set(repaint) <= set(evaluate.inpaint)
    assert (evaluate.inpaint.num_steps, evaluate.inpaint.spacing, evaluate.inpaint.variance) == (100, "leading", "auto")


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONFIG_DIR) / "callbacks").glob("*.yaml")))
def test_every_callbacks_option_shows_progress_and_saves_on_a_crash(tmp_path, option):
    # every kind of run (diffusion, first stage, noisy classifier) gets the step progress bar, not Lightning's
    # per-epoch one, and ddpmlab's crash checkpoint, written only after a trained step
    from ddpmlab.callbacks import OnExceptionCheckpoint
    from ddpmlab.callbacks.progress import StepProgressBar

    cfg = compose_cfg("train", [f"callbacks={option}"], tmp_path)
    built = [instantiate(c) for c in cfg.callbacks.values()]
    assert any(isinstance(c, StepProgressBar) for c in built)
    assert any(isinstance(c, OnExceptionCheckpoint) for c in built)


def test_first_stage_options_switch_the_mnist_autoencoder_as_a_whole(tmp_path):
    kl = compose_cfg("train", ["experiment=autoencoder_mnist"], tmp_path).first_stage
    assert (kl.net.regularizer, kl.net.latent_channels, kl.loss.reg_weight) == ("kl", 2, 1e-3)
    vq = compose_cfg("train", ["experiment=autoencoder_mnist", "first_stage=vq_f4"], tmp_path).first_stage
    # the VQ loss keeps its own weight: the KL weight of the MNIST preset must not leak into it
    assert (vq.net.regularizer, vq.net.latent_channels, vq.loss.reg_weight) == ("vq", 4, 1.0)
    assert kl.net.base_channels == vq.net.base_channels == 16  # the experiment's size applies to either


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")))
def test_every_model_config_declares_every_key_its_network_takes(option):
    """So that ``model.<key>=...`` overrides any of them on every model, e.g. ``model.learn_sigma=true``."""
    import inspect

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{option}.yaml")
    takes = set(inspect.signature(get_class(node._target_).__init__).parameters) - {"self"}
    assert takes <= set(node) - {"_target_"}, f"model/{option}.yaml lacks {sorted(takes - set(node))}"


def test_the_readmes_learned_variance_command_composes_on_the_default(tmp_path):
    cfg = compose_cfg("train", ["model.learn_sigma=true", "objective=hybrid"], tmp_path)
    assert build_denoiser(cfg).net.learn_sigma
