"""Many LoRA adapters on one base model, each batch row with its own adapter.

PEFT's mixed-adapter inference (`adapter_names=`) made SmolLM2 decode steps 1.8x slower even for
rows on the base, and 2.6x for rows on an adapter (tests/benchmarks/bench_serving.py, 1 thread):
its per-layer Python and hooks dominate at serving batch sizes. Here every targeted nn.Linear is
wrapped once and the adapters' matrices are stacked per layer (slot 0 = zeros = the base):

    [W; A_0; A_1; ...]  one weight, [out + n*r, in]; the base Linear's weight is a view of its top
    B_cat = [s_0 B_0 | s_1 B_1 | ...]  [out, n*r], each slot's scale folded in

so that a batch whose rows use different adapters costs three kernels per layer:

    z = x @ [W; A]^T                    # base output and every adapter's x @ A_a^T in one matmul
    y = z[:, :out] + (z[:, out:] * M) @ B_cat^T   # M: each row's one-hot slot, repeated r times

At decode batch sizes every kernel launch counts on a CPU (a 8x576x576 bf16 matmul takes ~70 us on
one thread), so this beat a pair of gathered matmuls per adapter present plus an index_add (3x less
overhead per layer, measured in the same benchmark). Batches with every row on the base skip the
LoRA term. The hot adapter (the champion) can also be kept merged, W + s*B@A in a second copy of
the weights, so that batches all on the champion cost what the base costs. Adapters with different
ranks are zero-padded to the largest rank, which changes nothing in the product.

Reads PEFT's saved format (adapter_config.json + adapter_model.safetensors). Supported: plain
LoRA on nn.Linear modules (r, lora_alpha, use_rslora, rank/alpha patterns). Refused with a clear
error: DoRA, modules_to_save, embedding / non-Linear targets, fan_in_fan_out.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn


class AdapterFormatError(ValueError):
    """An adapter folder this loader cannot apply exactly."""


class _Rows:
    """The adapter slot of each batch row, shared by all wrapped layers (set before each forward)."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None  # LongTensor [B]; None or all-zero = base
        self.single: int | None = None  # every row on this one slot (fast path)
        self._masks: dict[tuple, torch.Tensor] = {}

    def set(self, idx: torch.Tensor | None) -> None:
        self.idx = idx
        uniq = [] if idx is None else torch.unique(idx).tolist()
        self.single = uniq[0] if len(uniq) == 1 else None
        self._masks = {}

    def mask(self, slots: int, rank: int, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1.., slots*rank]: 1 on the columns of each row's own slot, 0 elsewhere (cached per
        shape for the forward passes until the rows change)."""
        key = (slots, rank, ndim, dtype)
        if key not in self._masks:
            onehot = nn.functional.one_hot(self.idx, slots).to(dtype)  # [B, slots]
            cols = onehot.repeat_interleave(rank, dim=1)  # [B, slots*rank]
            self._masks[key] = cols.view(cols.shape[0], *([1] * (ndim - 2)), cols.shape[1])
        return self._masks[key]


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: _Rows):
        super().__init__()
        self.base = base
        self.rows = rows
        dt, dev = base.weight.dtype, base.weight.device
        self.register_buffer("A", torch.zeros(1, 1, base.in_features, dtype=dt, device=dev), persistent=False)
        self.register_buffer("B", torch.zeros(1, base.out_features, 1, dtype=dt, device=dev), persistent=False)
        self.register_buffer("scale", torch.zeros(1, dtype=dt, device=dev), persistent=False)
        self.merged: dict[int, torch.Tensor] = {}  # slot -> W + scale * B @ A (the hot adapter)
        # ([W; A], its bias, B_cat, each slot's scaled B alone), built on the first adapter forward
        self._stacked: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows.single is not None and rows.single in self.merged:
            return nn.functional.linear(x, self.merged[rows.single], self.base.bias)
        if rows.single == 0 or rows.idx is None:
            return self.base(x)
        w_a, bias, b_cat, b_slot = self._stacked or self._stack()
        out = self.base.out_features
        z = nn.functional.linear(x, w_a, bias)
        if rows.single is not None:  # every row on one unmerged adapter: its own columns, no mask
            r = self.A.shape[1]
            lo = out + rows.single * r
            return z[..., :out] + nn.functional.linear(z[..., lo:lo + r], b_slot[rows.single])
        h = z[..., out:] * rows.mask(self.A.shape[0], self.A.shape[1], x.dim(), x.dtype)
        return z[..., :out] + nn.functional.linear(h, b_cat)

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
        """Build [W; A_0; A_1; ...] and B_cat; the base Linear's weight becomes a view of the top
        rows, so the stack costs only the adapters' memory."""
        n, r, d_in = self.A.shape
        out = self.base.out_features
        w_a = torch.cat([self.base.weight.detach(), self.A.reshape(n * r, d_in)])
        self.base.weight.data = w_a[:out]
        bias = self.base.bias
        if bias is not None:
            bias = torch.cat([bias.detach(), bias.new_zeros(n * r)])
        b_cat = (self.B.float() * self.scale.float().view(n, 1, 1)).permute(1, 0, 2).reshape(out, n * r)
        b_cat = b_cat.to(self.B.dtype).contiguous()
        self._stacked = (w_a, bias, b_cat, [b_cat[:, s * r:(s + 1) * r].contiguous() for s in range(n)])
        return self._stacked

    def merge(self, slot: int) -> None:
        """Precompute W + scale * B @ A for `slot`, in fp32 and then cast: merging in bf16 rounds
        small adapter deltas away (docs/performance.md)."""
        w = self.base.weight.float() + float(self.scale[slot]) * (self.B[slot].float() @ self.A[slot].float())
        self.merged = {slot: w.to(self.base.weight.dtype)}

    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Write one adapter's matrices into `slot` (growing the stacks and the rank as needed)."""
        self.merged.pop(slot, None)
        self._stacked = None
        r = max(self.A.shape[1], A.shape[0] if A is not None else 0)
        n = max(self.A.shape[0], slot + 1)
        if (n, r) != (self.A.shape[0], self.A.shape[1]):
            newA = self.A.new_zeros(n, r, self.A.shape[2])
            newB = self.B.new_zeros(n, self.B.shape[1], r)
            newA[: self.A.shape[0], : self.A.shape[1]] = self.A
            newB[: self.B.shape[0], :, : self.B.shape[2]] = self.B
            news = self.scale.new_zeros(n)
            news[: self.scale.shape[0]] = self.scale
            self.A, self.B, self.scale = newA, newB, news
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scale[slot] = 0.0
        if A is not None:
            self.A[slot, : A.shape[0]] = A.to(self.A.dtype)
            self.B[slot, :, : B.shape[1]] = B.to(self.B.dtype)
            self.scale[slot] = scale


class MultiLora:
    """Wraps a causal LM's linear layers once; loads, unloads and selects adapters by name."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = _Rows()
        self.layers: dict[str, MultiLoraLinear] = {}
        self.slots: dict[str, int] = {}  # adapter name -> slot (0 = base)

    def _wrap(self, names: set[str]) -> None:
        for name in sorted(names - set(self.layers)):
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            module = getattr(parent, child)
            if isinstance(module, MultiLoraLinear):
                self.layers[name] = module
                continue
            if not isinstance(module, nn.Linear):
                raise AdapterFormatError(f"LoRA target {name} is a {type(module).__name__}, not a Linear layer")
            wrapped = MultiLoraLinear(module, self.rows)
            setattr(parent, child, wrapped)
            self.layers[name] = wrapped

    def load(self, name: str, folder: str | Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise AdapterFormatError(f"{folder}: peft_type {cfg.get('peft_type')} is not LORA")
        for key in ("use_dora", "modules_to_save", "fan_in_fan_out", "layer_replication"):
            if cfg.get(key):
                raise AdapterFormatError(f"{folder}: {key} is not supported by the serving LoRA loader")
        weights_file = folder / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise AdapterFormatError(f"{folder} has no adapter_model.safetensors")
        sd = load_file(str(weights_file))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in sd.items():
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if m is None:
                raise AdapterFormatError(f"{folder}: unexpected tensor {key} (only lora_A/lora_B weights are served)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        self._wrap(set(pairs))
        slot = self.slots.get(name) or self._free_slot()
        r_default, alpha_default = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        for layer_name, layer in self.layers.items():
            ab = pairs.get(layer_name)
            if ab is None:
                layer.set_slot(slot, None, None, 0.0)
                continue
            r = _pattern(cfg.get("rank_pattern") or {}, layer_name, r_default)
            alpha = _pattern(cfg.get("alpha_pattern") or {}, layer_name, alpha_default)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            A, B = ab["A"], ab["B"]
            if A.shape[1] != layer.base.in_features or B.shape[0] != layer.base.out_features:
                raise AdapterFormatError(f"{folder}: {layer_name} has shapes {tuple(A.shape)}/{tuple(B.shape)}, "
                                         f"the base layer is {layer.base.in_features}->{layer.base.out_features}; "
                                         f"was it trained on another base model?")
            layer.set_slot(slot, A, B, scale)
        self.slots[name] = slot

    def merge(self, name: str | None) -> None:
        """Keep a merged copy of the weights for adapter `name` (None: drop it). Batches whose rows
        all use that adapter then run at base-model speed, at the cost of one more copy of the
        targeted weights in memory; mixed batches use the stacked path."""
        slot = self.slots.get(name) if name is not None else None
        for layer in self.layers.values():
            if slot is None:
                layer.merged = {}
            else:
                layer.merge(slot)

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.set_slot(slot, None, None, 0.0)

    def _free_slot(self) -> int:
        used = set(self.slots.values())
        return next(i for i in range(1, len(used) + 2) if i not in used)

    def select(self, names: list[str | None], device: torch.device) -> None:
        """Set the rows' adapters for the next forward passes (None = base)."""
        slots = [self.slots[n] if n is not None else 0 for n in names]
        self._set(torch.tensor(slots, device=device))

    def _set(self, idx: torch.Tensor) -> None:
        self.rows.set(idx)

    def keep_rows(self, keep: torch.Tensor) -> None:
        if self.rows.idx is not None:
            self._set(self.rows.idx[keep])


def _pattern(patterns: dict, layer_name: str, default: float) -> float:
    for key, value in patterns.items():
        if re.search(rf"(^|\.){re.escape(key)}$", layer_name) or re.fullmatch(key, layer_name):
            return value
    return default
