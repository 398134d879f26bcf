"""Trainable adapters on the two policies: LoRA and LoKr (peft) and KAdapter (thesis ch. 2).

One `adapter:` recipe section per policy (`rl.config.AdapterConfig`) picks the kind:

    lora      dW = B A                                      peft LoRA (Flow-GRPO, UAE sec. 2.1)
    lokr      dW = w1 (kron) (w2_a w2_b)                    peft LoKr: one Kronecker term per module
    kadapter  dW = sum_{i=1..n} A_i (kron) (u_i v_i^T)      thesis eq. 2.4 (KAdaptation) / eq. 9.2

KAdapter (thesis sec. 2.2.2): the n "slow" matrices A_i (n x n) are shared by every adapted layer
of a policy (`shared: true`), the "fast" B_i = u_i v_i^T (d_out/n x d_in/n, rank r) are per layer.
Per layer it costs r (d_out + d_in) parameters, exactly a rank-r LoRA, plus n^3 shared ones, yet
rank(dW) can reach min(n^2 r, d_out, d_in) instead of r. dW merges into W: no inference cost.

The rest of the code sees adapters only through this module:

    apply_adapter(module, cfg, policy)  install the configured adapter (returns the module to keep)
    adapter_parameters(module)          the trainable tensors, by name marker: lora_ / lokr_ / kadapter_
    disabled(module)                    context: the base model (the GRPO reference policy)
    merge_into_base(module)             fold dW into W and drop the adapter layers (export)

Exporting a KAdapter (no peft/diffusers format exists for it): merge, then save the plain model.

    from rl.adapters import merge_into_base
    enc = merge_into_base(models.encoder.model)            # a plain Qwen2_5_VLForConditionalGeneration
    enc.save_pretrained("exported/encoder_merged")         # load: Qwen2_5_VLForConditionalGeneration.from_pretrained(...)
    dec = merge_into_base(models.decoder.transformer)      # a plain SD3Transformer2DModel
    dec.save_pretrained("exported/decoder_merged/transformer")  # load: SD3Transformer2DModel.from_pretrained(...)

`merge_into_base` works in place (deepcopy first to keep training). The unmerged alternative is
`trainable_state()` (keys `encoder.<...>.kadapter_u`, `encoder.kadapter_bank.A`, ...), loaded with
`build_models(recipe)` + `load_trainable_state`: it needs this repository, the merged export does not.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from typing import Iterator

import torch
from torch import nn

from rl.config import AdapterConfig

ADAPTER = "default"  # peft adapter name
# Only the language model's attention: the vision tower stays frozen (UAE follows Flow-GRPO's LoRA).
ENCODER_TARGETS = r".*language_model.*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
# Flow-GRPO's SD3 targets: both streams' attention projections.
DECODER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DEFAULT_TARGETS = {"encoder": ENCODER_TARGETS, "decoder": DECODER_TARGETS}
# A parameter is an adapter's iff its name holds one of these (peft LoRA, peft LoKr, KAdapter).
MARKERS = ("lora_", "lokr_", "kadapter_")


# ----------------------------------------------------------------------------------------------
# KAdapter
# ----------------------------------------------------------------------------------------------
class KAdapterBank(nn.Module):
    """The slow weights A (n_terms, n, n), shared by all adapted layers of one policy.

    Registered once on the adapted model as `kadapter_bank` (parameter `kadapter_bank.A`), so
    `named_parameters()` lists it once and the optimizer, checkpoints and weight sync see one tensor
    that collects gradients from every layer.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        super().__init__()
        self.n = n
        # N(0, 1/n): each output block of A_i x mixes n input blocks; keeps dW's scale independent of n.
        self.A = nn.Parameter(torch.randn(n, n, n, dtype=dtype, device=device) / math.sqrt(n))


class KAdapterLinear(nn.Module):
    """`base_layer(x) + scale * x dW^T` with dW = sum_{i=1..n} A_i (kron) (u_i v_i^T) (thesis eq. 2.4).

    base_layer: nn.Linear with weight (d_out, d_in), both divisible by n; p = d_out/n, q = d_in/n.
    kadapter_u: (n, p, r), kadapter_v: (n, q, r): the fast weights B_i = u_i v_i^T (p, q).
    kadapter_A: (n, n, n), only when not shared; else A comes from the policy's `KAdapterBank`.
    scale = alpha / r (as LoRA, so alpha keeps its meaning across kinds).

    Init "default": A ~ N(0, 1/n), u ~ kaiming-uniform (LoRA's A init), v = 0, so dW = 0 and the
    adapted model starts as the base (the thesis does not fix an init; this is LoRA's choice, the one
    GRPO needs: pi_theta = pi_ref at step 0). "random": v ~ kaiming-uniform too (dW != 0; tests and
    ablations only).
    """

    def __init__(self, base_layer: nn.Linear, n: int, r: int, alpha: float, dropout: float = 0.0,
                 bank: KAdapterBank | None = None, init: str = "default"):
        super().__init__()
        d_out, d_in = base_layer.weight.shape
        self.base_layer = base_layer
        self.n, self.r, self.scale = n, r, alpha / r
        self.p, self.q = d_out // n, d_in // n
        w = base_layer.weight
        self.kadapter_u = nn.Parameter(torch.empty(n, self.p, r, dtype=w.dtype, device=w.device))
        self.kadapter_v = nn.Parameter(torch.zeros(n, self.q, r, dtype=w.dtype, device=w.device))
        for i in range(n):
            nn.init.kaiming_uniform_(self.kadapter_u.data[i], a=math.sqrt(5))
            if init == "random":
                nn.init.kaiming_uniform_(self.kadapter_v.data[i], a=math.sqrt(5))
        if bank is None:
            self.kadapter_A = nn.Parameter(KAdapterBank(n, w.dtype, w.device).A.data)
        else:
            object.__setattr__(self, "_bank", bank)  # not a submodule: registered once, on the model
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False

    # peft's tuner layers forward these too; HF/diffusers code sometimes reads `proj.weight.dtype`.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def A(self) -> torch.Tensor:
        """The slow weights (n, n, n): this layer's own, or the shared bank's."""
        return self.kadapter_A if "kadapter_A" in self._parameters else self._bank.A

    def delta_weight(self) -> torch.Tensor:
        """dW (d_out, d_in) = sum_i kron(A_i, u_i v_i^T), materialised (merge, tests)."""
        B = torch.einsum("ipr,iqr->ipq", self.kadapter_u, self.kadapter_v)  # (n, p, q)
        # kron(A_i, B_i)[a p + b, c q + d] = A_i[a, c] B_i[b, d]
        dw = torch.einsum("iac,ibd->abcd", self.A, B)  # (n, p, n, q)
        return dw.reshape(self.n * self.p, self.n * self.q)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        """x dW^T without materialising dW: with X = x viewed as (n, q) blocks,
        (kron(A, u v^T) x)[a, :] = sum_c A[a, c] u v^T X[c, :]  ->  A X v u^T. x: (..., d_in)."""
        X = x.reshape(*x.shape[:-1], self.n, self.q)  # (..., n, q)
        t = torch.einsum("...cd,idr->...icr", X, self.kadapter_v)  # (..., i, n, r)
        t = torch.einsum("...icr,ipr->...icp", t, self.kadapter_u)  # (..., i, n, p)
        y = torch.einsum("iac,...icp->...ap", self.A, t)  # (..., n, p)
        return y.reshape(*x.shape[:-1], self.n * self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged == self.enabled:  # merged and on (W holds dW), or unmerged and off
            return out
        delta = self.scale * self._delta(self.dropout(x) if self.enabled else x).to(out.dtype)
        return out + delta if self.enabled else out - delta  # off while merged: take dW back out

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale dW (thesis: "merged with the main weights ... no latency")."""
        if not self.merged:
            self.base_layer.weight += (self.scale * self.delta_weight()).to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= (self.scale * self.delta_weight()).to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        shared = "_bank" in self.__dict__
        return f"n={self.n}, r={self.r}, scale={self.scale:g}, shared={shared}"


def _matches(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a string is a regex over the full module name; a list matches name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _apply_kadapter(model: nn.Module, cfg: AdapterConfig, targets: str | list[str], policy: str) -> None:
    # 1) find the target linears and check that n divides their dims (before touching the model)
    found = [(name, m) for name, m in model.named_modules() if _matches(name, targets)]
    if not found:
        raise ValueError(f"{policy}.adapter.target_modules={targets!r} matches no module of the {policy}")
    for name, m in found:
        if not isinstance(m, nn.Linear):
            raise ValueError(f"kadapter adapts nn.Linear only; {policy} module {name!r} is {type(m).__name__}: "
                             f"narrow models.{policy}.adapter.target_modules")
        d_out, d_in = m.weight.shape
        if d_out % cfg.n or d_in % cfg.n:
            raise ValueError(f"models.{policy}.adapter.n={cfg.n} must divide both dims of {name!r} "
                             f"(d_out={d_out}, d_in={d_in}): pick a common divisor of the adapted layers' dims")
    # 2) one shared bank per policy, registered on the model itself
    w = found[0][1].weight
    bank = KAdapterBank(cfg.n, w.dtype, w.device) if cfg.shared else None
    if bank is not None:
        model.kadapter_bank = bank
    # 3) wrap each target in place (collected first: the module tree changes under us)
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, KAdapterLinear(m, cfg.n, cfg.r, cfg.alpha, cfg.dropout, bank, cfg.init))


# ----------------------------------------------------------------------------------------------
# The public API
# ----------------------------------------------------------------------------------------------
def _peft_config(cfg: AdapterConfig, policy: str, targets: str | list[str]):
    if cfg.kind == "lora":
        from peft import LoraConfig

        # "default" keeps each policy's historical init: kaiming A (encoder), gaussian A (decoder, Flow-GRPO)
        init = {"default": True if policy == "encoder" else "gaussian", "gaussian": "gaussian"}[cfg.init]
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets, init_lora_weights=init)
    from peft import LoKrConfig

    # LoKr: dW = w1 (kron) w2 with w1 about n x n (decompose_factor) and w2 of rank r; w2 = 0 at init.
    return LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, decompose_factor=cfg.n,
                      target_modules=targets, init_weights={"default": True, "lycoris": "lycoris"}[cfg.init])


def apply_adapter(module: nn.Module, cfg: AdapterConfig, policy: str) -> nn.Module:
    """Install `cfg`'s adapter on `module` (the encoder's LVLM or the decoder's transformer).

    Returns the module to keep: for the encoder with lora/lokr a peft `PeftModel` wrapping `module`
    (what export and vLLM expect); otherwise `module` itself, adapted in place (the decoder through
    diffusers' `add_adapter`, which also takes LoKr configs; kadapter by wrapping the target linears).
    The caller seeds torch first: every process must draw the same initial adapter.
    """
    if policy not in DEFAULT_TARGETS:
        raise ValueError(f"unknown policy {policy!r}: encoder or decoder")
    targets = cfg.target_modules or DEFAULT_TARGETS[policy]
    if cfg.kind == "kadapter":
        _apply_kadapter(module, cfg, targets, policy)
        return module
    peft_cfg = _peft_config(cfg, policy, targets)
    if policy == "encoder":
        from peft import get_peft_model

        return get_peft_model(module, peft_cfg, adapter_name=ADAPTER)
    module.add_adapter(peft_cfg, adapter_name=ADAPTER)
    return module


def named_adapter_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter tensor of any kind; a shared KAdapter bank appears once."""
    for name, p in module.named_parameters():
        if any(m in name for m in MARKERS):
            yield name, p


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in named_adapter_parameters(module)]


def _kadapter_layers(module: nn.Module) -> list[KAdapterLinear]:
    return [m for m in module.modules() if isinstance(m, KAdapterLinear)]


# The layers `disabled` switches, found once per module: walking a model's modules took a few ms per
# reference pass (more than a tiny model's forward). Adapters are installed once (`apply_adapter`,
# at build); `merge_into_base`, which removes them, forgets the module.
_SWITCHES: "weakref.WeakKeyDictionary[nn.Module, tuple[str, list[nn.Module]]]" = weakref.WeakKeyDictionary()


def _switches(module: nn.Module) -> tuple[str, list[nn.Module]]:
    """("kadapter", its KAdapterLinear layers), ("peft", the peft tuner layers and auxiliary wrappers
    that peft's disable_adapter switches), or ("other", []) for anything else."""
    if module not in _SWITCHES:
        kadapters = _kadapter_layers(module)
        if kadapters:
            _SWITCHES[module] = ("kadapter", kadapters)
        elif _peft_layer_switchable(module):
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            # peft's BaseTuner._enable_adapter_layers switches exactly these
            _SWITCHES[module] = ("peft", [m for m in module.base_model.model.modules()
                                          if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))])
        else:
            _SWITCHES[module] = ("other", [])
    return _SWITCHES[module]


def _peft_layer_switchable(module: nn.Module) -> bool:
    """A PeftModel whose adapters are layers (LoRA, LoKr, ...: peft's disable_adapter's last branch),
    without a bias (peft warns that disabling those does not give the base model)."""
    from peft import PeftModel

    if not isinstance(module, PeftModel):
        return False
    cfg = module.peft_config[module.active_adapter]
    return not (cfg.is_prompt_learning or cfg.is_adaption_prompt) and getattr(cfg, "bias", "none") == "none"


@contextlib.contextmanager
def disabled(module: nn.Module) -> Iterator[None]:
    """The base model for the duration (the reference policy pi_ref of GRPO's KL term).

    A peft model with layer adapters is switched as peft's `disable_adapter` does it (each tuner
    layer's `enable_adapters(False)`, then `enable_adapters(True)` for those that were on), on the
    layers found at the first call, without peft's per-call model walk and status report."""
    kind, layers = _switches(module)
    if kind == "peft":
        before = [not m.disable_adapters for m in layers]
        was, module._adapters_disabled = module._adapters_disabled, True
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m, on in zip(layers, before):
                if on:
                    m.enable_adapters(True)
            module._adapters_disabled = was
        return
    kadapters = layers if kind == "kadapter" else []
    if kadapters:
        before = [m.enabled for m in kadapters]
        for m in kadapters:
            m.enabled = False
        try:
            yield
        finally:
            for m, on in zip(kadapters, before):
                m.enabled = on
    elif hasattr(module, "disable_adapter"):  # peft PeftModel (encoder lora/lokr)
        with module.disable_adapter():
            yield
    elif hasattr(module, "disable_adapters"):  # diffusers model with a peft adapter (decoder lora/lokr)
        module.disable_adapters()
        try:
            yield
        finally:
            module.enable_adapters()
    else:
        raise TypeError(f"{type(module).__name__} carries no adapter to disable")


def merge(module: nn.Module) -> None:
    """Fold every KAdapter's dW into its base weight (reversible: `unmerge`)."""
    for m in _kadapter_layers(module):
        m.merge()


def unmerge(module: nn.Module) -> None:
    for m in _kadapter_layers(module):
        m.unmerge()


@torch.no_grad()
def merge_into_base(module: nn.Module) -> nn.Module:
    """W <- W + dW for every adapted layer, then drop the adapter layers: the plain base model class
    with the base's parameter names, which `save_pretrained` writes and `from_pretrained` reads with
    no peft and no repository code. In place; returns the model to keep (a PeftModel is unwrapped)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    _SWITCHES.pop(module, None)
    if isinstance(module, PeftModel):
        return module.merge_and_unload()
    for name, m in list(module.named_modules()):
        if isinstance(m, KAdapterLinear):
            m.merge()
            base = m.base_layer
        elif isinstance(m, BaseTunerLayer):  # diffusers' add_adapter (lora/lokr)
            m.merge()
            base = m.get_base_layer()
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
    if isinstance(getattr(module, "kadapter_bank", None), KAdapterBank):
        del module.kadapter_bank
    module.__dict__.pop("peft_config", None)  # diffusers' add_adapter bookkeeping
    if getattr(module, "_hf_peft_config_loaded", False):
        module._hf_peft_config_loaded = False
    return module
