"""PILoT inside the frameworks people train with, on CPU with tiny models built offline.

* torch AMP: ``scaler.unscale_(opt)``, ``clip_grad_norm_``, ``scaler.step(opt)`` with the
  default PILoT equals the same done by hand, bit for bit (a skipped inf step included).
* PyTorch Lightning: the docs/frameworks.md snippet runs with bf16-mixed and gradient clipping; a
  resume from a mid-epoch ``ckpt_path`` is bit-exact (parameters, every optimizer state
  tensor, α and the schedule's state).
* timm: the docs/frameworks.md snippet (``register()``, ``create_optimizer_v2(model, opt="pilot")``)
  leaves a ViT's ``pos_embed``/``cls_token`` plain; ``param_group_fn=param_groups`` too.
* Hugging Face: the docs/frameworks.md snippet (``optimizer_cls_and_kwargs`` with ``param_groups``)
  trains GPT-2; ``resume_from_checkpoint`` from a mid-epoch checkpoint is bit-exact.

The frameworks are in the ``test`` extra, so CI runs all of this; where one is missing the
test is skipped with a reason that says so.
"""
import inspect
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pilot_kernels import PILoT, param_groups

DOC = Path(__file__).resolve().parents[1] / "docs" / "frameworks.md"
REASON = "{} is in the test extra (pip install -e '.[test]'): without it this integration is not tested"


def doc_snippet(marker: str) -> str:
    """The python block of docs/frameworks.md that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one snippet with {marker!r} in {DOC.name}, found {len(found)}"
    return found[0]


def run_snippet(marker: str, without: str = "", **names):
    """Execute the snippet (less the line ``without``, if given) with ``names`` defined."""
    code = doc_snippet(marker)
    if without:
        assert without + "\n" in code
        code = code.replace(without + "\n", "")
    namespace = dict(names)
    exec(compile(code, f"docs/frameworks.md[{marker}]", "exec"), namespace)
    return namespace


def state_tensors(opt, params):
    return [(k, v) for p in params for k, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]


def assert_same_training(params_a, opt_a, params_b, opt_b, exact=True):
    """Parameters and every optimizer state tensor equal (bit for bit unless ``exact`` is
    False: fp32 rounding); the same α in every group."""
    params_a, params_b = list(params_a), list(params_b)
    tol = {} if exact else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, **(tol or dict(rtol=0, atol=0)))
    for (ka, a), (kb, b) in zip(state_tensors(opt_a, params_a), state_tensors(opt_b, params_b), strict=True):
        assert ka == kb
        torch.testing.assert_close(a, b, msg=ka, **(tol or dict(rtol=0, atol=0)))
    assert [g["alpha"] for g in opt_a.param_groups] == [g["alpha"] for g in opt_b.param_groups]


# ---------------------------------------------------------------------------------- torch
def test_torch_amp_unscale_clip_step_matches_the_same_done_by_hand():
    """The default PILoT (fused_unscale=True) with GradScaler: unscale_, clip, step.
    Step 2 has an inf gradient: the scaler skips it and PILoT changes nothing."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        return model, PILoT(param_groups(model), lr=0.1, momentum=0.9, alpha=1e-3, weight_decay=1e-2)

    xs = [torch.randn(4, 5) for _ in range(4)]
    scales = [None] * 4  # the scale the scaler used at each step
    model, opt = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, x in enumerate(xs):
        opt.zero_grad()
        loss = model(x).pow(2).mean() * (float("inf") if i == 2 else 1.0)
        scales[i] = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        scaler.step(opt)
        scaler.update()
    assert scales[3] == scales[2] / 2  # the inf step was seen and skipped

    hand, hand_opt = build()
    for i, x in enumerate(xs):
        hand_opt.zero_grad()
        loss = hand(x).pow(2).mean() * (float("inf") if i == 2 else 1.0)
        (loss * scales[i]).backward()
        grads = [p.grad for p in hand.parameters()]
        if not all(torch.isfinite(g).all() for g in grads):
            continue  # what the scaler does with an inf/NaN gradient
        for g in grads:
            g.mul_(1.0 / scales[i])  # a power of two: exact, as the scaler's unscale
        torch.nn.utils.clip_grad_norm_(hand.parameters(), max_norm=0.05)
        hand_opt.step()
    # Split tensors bit for bit; under AMP the plain ones take torch's fused SGD kernel
    # (it reads found_inf), by hand its for-loop twin: they may differ by one rounding.
    split = [p for p in model.parameters() if "m" in opt.state[p]]
    hand_split = [p for p in hand.parameters() if "m" in hand_opt.state[p]]
    assert len(split) == 2
    assert_same_training(split, opt, hand_split, hand_opt)
    assert_same_training(model.parameters(), opt, hand.parameters(), hand_opt, exact=False)


def test_docs_param_groups_snippet():
    model = _mlp()
    opt = run_snippet("opt = PILoT(param_groups(model)", model=model)["opt"]
    assert [(g["reparam"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(True, 5e-5, 2),
                                                                                             (False, 0.0, 4)]


# ------------------------------------------------------------------------------ Lightning
def _tiny_classification(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def test_lightning_docs_snippet_bf16_clipping_and_logging(tmp_path, monkeypatch):
    pl = pytest.importorskip("lightning.pytorch", reason=REASON.format("lightning"))
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints/ here
    loader = torch.utils.data.DataLoader(_tiny_classification(), batch_size=4)
    ns = run_snippet("lightning.pytorch", model=_mlp(), train_loader=loader, EPOCHS=2)
    trainer, schedule = ns["trainer"], ns["schedule"]
    assert trainer.global_step == 12 and trainer.precision == "bf16-mixed"
    assert trainer.gradient_clip_val == 1.0
    sched = schedule.scheduler
    assert sched.last_epoch == 2 and isinstance(sched.previous_acc, float)
    opt = trainer.optimizers[0]
    assert [g["alpha"] for g in opt.param_groups] == sched.get_last_alpha()
    logged = trainer.callback_metrics
    assert float(logged["pilot/alpha"]) == pytest.approx(sched.get_last_alpha()[0])
    assert float(logged["pilot/l1"]) == pytest.approx(float(opt.l1_norm()))
    assert 0.0 <= float(logged["pilot/sparsity_0.001"]) <= 1.0

    # Why the snippet sets fused_unscale=False: Lightning refuses to clip otherwise.
    class Fused(ns["Classifier"]):
        def configure_optimizers(self):
            return PILoT(param_groups(self), lr=0.1, alpha=1e-4)

    refusing = pl.Trainer(max_steps=1, precision="bf16-mixed", gradient_clip_val=1.0, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(Exception, match="does not allow for gradient clipping"):
        refusing.fit(Fused(_mlp()), loader)


class _ResumableLoader(torch.utils.data.DataLoader):
    """A loader Lightning can resume mid-epoch: it saves ``state_dict()`` with the
    checkpoint and, after ``load_state_dict``, skips the batches already consumed."""

    _skip = 0
    _served = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._served += 1
                yield batch

    def state_dict(self):
        return {"consumed": self._served}

    def load_state_dict(self, state):
        self._skip = state["consumed"]


def test_lightning_mid_epoch_resume_is_exact(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason=REASON.format("lightning"))
    torchmetrics = pytest.importorskip("torchmetrics", reason=REASON.format("lightning (with torchmetrics)"))
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pilot_kernels import AdaptiveAlpha
    from pilot_kernels.integrations.lightning import AlphaSchedule

    class Net(pl.LightningModule):
        def __init__(self, seed):
            super().__init__()
            self.net = _mlp(seed)
            # The epoch accuracy AdaptiveAlpha reads must survive a mid-epoch restart:
            # a persistent metric is part of the checkpoint (self.log's means are not).
            self.train_acc = torchmetrics.MeanMetric()
            self.train_acc.persistent(True)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.train_acc.update((logits.argmax(1) == y).float().mean())
            self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
            return nn.functional.cross_entropy(logits, y)

        def configure_optimizers(self):
            return PILoT(param_groups(self), lr=0.1, momentum=0.9, alpha=1e-3, fused_unscale=False)

    def fit(seed, callbacks, ckpt_path=None):
        schedule = AlphaSchedule(lambda opt: AdaptiveAlpha(opt, total_epochs=3, delta=1.5), monitor="train_acc")
        trainer = pl.Trainer(max_epochs=3, precision="bf16-mixed", gradient_clip_val=1.0, accelerator="cpu",
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, callbacks=[schedule, *callbacks])
        module = Net(seed)
        trainer.fit(module, _ResumableLoader(_tiny_classification(), batch_size=4), ckpt_path=ckpt_path)
        return module, trainer.optimizers[0], schedule.scheduler

    # 3 epochs of 6 steps; the checkpoint after step 9 is in the middle of epoch 2.
    every9 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=9, save_top_k=-1, filename="{step}")
    full, full_opt, full_sched = fit(0, [every9])
    resumed, resumed_opt, resumed_sched = fit(7, [], ckpt_path=tmp_path / "step=9.ckpt")
    assert_same_training(full.parameters(), full_opt, resumed.parameters(), resumed_opt)
    assert resumed_sched.state_dict() == full_sched.state_dict()
    assert full_sched.last_epoch == 3


def test_lightning_step_interval_counts_optimizer_steps_and_callback_errors(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason=REASON.format("lightning"))
    from types import SimpleNamespace

    from pilot_kernels import AdaptiveAlpha, HarmonicAlpha
    from pilot_kernels.integrations.lightning import AlphaSchedule

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return PILoT(param_groups(self), lr=0.1, alpha=1e-3)

    schedule = AlphaSchedule(lambda opt: HarmonicAlpha(opt), interval="step", sparsity_thresholds=())
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[schedule])
    trainer.fit(Net(), torch.utils.data.DataLoader(_tiny_classification(), batch_size=4))
    assert trainer.global_step == 3 and schedule.scheduler.last_epoch == 3  # 6 batches, 2 per step
    assert trainer.optimizers[0].param_groups[0]["alpha"] == pytest.approx(1e-3 / 4)

    # Errors that say what to fix, before training starts.
    opt = PILoT(param_groups(_mlp()), lr=0.1, alpha=1e-3)
    fake = SimpleNamespace(optimizers=[opt], global_step=0)
    with pytest.raises(ValueError, match="monitor="):
        AlphaSchedule(lambda o: AdaptiveAlpha(o, total_epochs=3)).on_fit_start(fake, None)
    with pytest.raises(ValueError, match="exactly one PILoT"):
        AlphaSchedule(HarmonicAlpha).on_fit_start(SimpleNamespace(optimizers=[], global_step=0), None)
    with pytest.raises(ValueError, match="interval"):
        AlphaSchedule(HarmonicAlpha, interval="batch")
    with pytest.raises(TypeError, match="lambda opt"):
        AlphaSchedule(HarmonicAlpha(opt))


# ----------------------------------------------------------------------------------- timm
def _tiny_vit():
    timm = pytest.importorskip("timm", reason=REASON.format("timm"))
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=24,
                             depth=1, num_heads=2, num_classes=5)


def _split(model, opt):
    return {n for n, p in model.named_parameters() if "m" in opt.state[p]}


def test_timm_docs_snippet_follows_timm_grouping():
    model = _tiny_vit()
    ns = run_snippet("create_optimizer_v2", model=model)
    opt = ns["optimizer"]
    assert isinstance(opt, PILoT)
    helper = PILoT(param_groups(model), lr=0.1)
    assert _split(model, opt) == _split(model, helper)
    assert not {"pos_embed", "cls_token"} & _split(model, opt)
    # timm's groups: decay 5e-5 on the split tensors, none on the plain ones.
    for g in opt.param_groups:
        assert g["weight_decay"] == (5e-5 if g["reparam"] == "auto" else 0.0)
        assert g["alpha"] == 1e-4 and g["momentum"] == 0.9
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    opt.step()  # and it trains


def test_timm_param_group_fn_and_weight_decay_zero():
    from timm.optim import create_optimizer_v2

    from pilot_kernels.integrations.timm import register

    model = _tiny_vit()
    register()
    register()  # idempotent
    single = create_optimizer_v2(model, opt="pilot", lr=0.1, weight_decay=0.0)
    assert "pos_embed" in _split(model, single)  # one timm group: "auto" splits it
    chosen = create_optimizer_v2(model, opt="pilot", lr=0.1, weight_decay=0.0, param_group_fn=param_groups)
    assert _split(model, chosen) == _split(model, PILoT(param_groups(model), lr=0.1))
    if "fallback_no_weight_decay" in inspect.signature(create_optimizer_v2).parameters:  # timm with hybrid-optimizer fallback groups
        fallback = create_optimizer_v2(model, opt="pilot", lr=0.1, weight_decay=0.0, fallback_no_weight_decay=True)
        assert not {"pos_embed", "cls_token"} & _split(model, fallback)


# ---------------------------------------------------------------------------- Hugging Face
def test_hf_docs_snippet_and_exact_resume_from_a_mid_epoch_checkpoint(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers", reason=REASON.format("transformers"))
    pytest.importorskip("accelerate", reason=REASON.format("accelerate (the Trainer's)"))
    monkeypatch.chdir(tmp_path)

    def gpt2(seed):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=61, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)

    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 61, (24, 8), generator=g)]
    # 3 steps per epoch at the default batch size 8; the checkpoint after step 2 is mid-epoch.
    names = dict(train_dataset=data, MAX_STEPS=5, SAVE_STEPS=2)
    full = run_snippet("optimizer_cls_and_kwargs", model=gpt2(0), **names)
    trainer = full["trainer"]
    assert trainer.state.global_step == 5 and os.path.isdir("out/checkpoint-2")
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, PILoT)
    split = {n for n, p in trainer.model.named_parameters() if "m" in opt.state[p]}
    assert "transformer.wpe.weight" not in split and "transformer.h.0.attn.c_attn.weight" in split
    from pilot_kernels.integrations.hf import AlphaScheduleCallback

    def schedule_of(trainer):
        (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, AlphaScheduleCallback)]
        return cb.scheduler

    sched = schedule_of(trainer)
    assert sched.last_epoch == 5

    # A new process: the snippet's Trainer on a model with another init, resumed.
    resumed = run_snippet("optimizer_cls_and_kwargs", without="trainer.train()", model=gpt2(9), **names)["trainer"]
    resumed.train(resume_from_checkpoint="out/checkpoint-2")
    resumed_opt = getattr(resumed.optimizer, "optimizer", resumed.optimizer)
    assert_same_training(trainer.model.parameters(), opt, resumed.model.parameters(), resumed_opt)
    assert schedule_of(resumed).state_dict() == sched.state_dict()

    from pilot_kernels import AdaptiveAlpha

    with pytest.raises(TypeError, match="AdaptiveAlpha needs the epoch's training accuracy"):
        AlphaScheduleCallback(lambda o: AdaptiveAlpha(o, total_epochs=2)).on_train_begin(
            None, None, None, optimizer=PILoT(param_groups(_mlp()), lr=0.1, alpha=1e-3))
