"""Int8 weights: a model 4x smaller than fp32, and faster at generating text on a CPU.

Why it is faster. Generating one token multiplies every weight matrix by a single vector, so the
work is small and the time goes into *reading the weights from memory*: GPT-2 124M streams about
500 MB per token in fp32, 250 MB in bf16 and 125 MB in int8. On a laptop CPU, with ~20 GB/s of
memory bandwidth, the number of bytes per weight sets the speed.

How a weight matrix W (out x in) becomes int8 (symmetric, one scale per output row):

    scale[i] = max_j |W[i, j]| / 127
    Q[i, j]  = round(W[i, j] / scale[i])          an integer in [-127, 127]
    W        ~ Q * scale[:, None]                 error at most scale[i] / 2 per weight

A row has its own scale, so one large row does not blur the others.

How y = x @ W.T + b is computed. Two ways, chosen by `activations`:

- "int8" (dynamic quantization, the default on x86 CPUs): the input vector is also turned into
  8-bit integers at every call, with its own range; FBGEMM, PyTorch's x86 integer kernels, then
  multiplies int8 by int8 with int32 sums and rescales to fp32. Fastest: the weights are read
  once, as bytes, by kernels that keep up with the memory. From ONEDNN_FROM_ROWS input rows on
  (a prompt, a batch of sequences) the same product runs on oneDNN's int8 kernel (PyTorch's
  other x86 int8 engine, which uses AMX where the CPU has it), faster there than FBGEMM's; it
  keeps its own pre-arranged copy of the weight, made the first time such an input comes.
- "float" (weight-only): the input stays in floating point and the int8 weight is scaled back to
  floats for the product. More exact (only the weights are rounded), slower where no fused
  kernel exists; used on GPUs and wherever FBGEMM is missing.
- "int8-rows": like "int8", but each row of the input gets its own range (FBGEMM gives the whole
  batch one; here two extra rows pin that range to the integer grid, so FBGEMM multiplies the
  already-rounded rows as they are; without FBGEMM, `torch._int_mm` does the int8 product).
  Integer sums are exact, so their order does not matter, and nothing else mixes rows: a row's
  output is bit-identical whatever rows share the batch and however many there are. A server
  that batches independent requests (qkv.serve) needs that; FBGEMM's shared range does not
  give it. With an input row x rounded to q (int8) with step s and zero point z
  (x ~ s * (q + z)):

      x . W_j ~ s * scale[j] * (q . Q_j  +  z * sum_k Q_jk)

  the second term precomputed per output row.

Quality is measured, not assumed: benchmarks/bench_decode.py prints the validation loss of a
trained model with fp32, bf16 and int8 weights (see docs/training.md).

    model = qkv.quantize_int8(model)   # in place: every nn.Linear, and the output layer

bf16 weights have a fast path of their own for inference on a CPU, `pack_linears`: each weight
is laid out once in the blocked form oneDNN's kernel multiplies, instead of at every call, so a
decoding step reads each weight once (see PackedLinear and docs/performance.md); the products
are the same numbers as nn.Linear's.

    model = qkv.quantize.pack_linears(model.to(torch.bfloat16))   # opt-in, in place
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError

ACTIVATIONS = ("int8", "int8-rows", "float")
# Two private torch functions, used on purpose (no public equivalent): the per-channel quantized
# tensor that FBGEMM's prepack takes, and the weight-only int8 kernel. torch's stubs do not
# export them, hence the cast.
_torch_private: Any = cast(Any, torch)
_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT_MM = hasattr(torch, "_int_mm")


def _check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise InputError(f"activations={activations!r} is not one of {', '.join(ACTIVATIONS)}")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 matrix, fp32 scale per row) with weight ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,) a zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@functools.cache  # asked at every forward: answer once
def fbgemm_available() -> bool:
    """Whether PyTorch has its x86 int8 kernels (FBGEMM) on this machine."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic")


@functools.cache
def onednn_available() -> bool:
    """Whether PyTorch's int8 engine "onednn" is built in."""
    return "onednn" in torch.backends.quantized.supported_engines


#: From this many input rows on, "int8" runs on oneDNN's int8 kernel instead of FBGEMM's:
#: measured in a GPT-2 124M model (1 thread), FBGEMM is faster for 1-3 rows (15.2 against
#: 18.4 ms a step at 1 row), oneDNN from 4 (25.5 against 28.5 ms at 8 rows; a prompt of 8 x 32
#: tokens 84 against 155 ms); at 2 threads, 16.2 against 16.8 ms and 50 against 85 ms.
ONEDNN_FROM_ROWS = 4

#: The kernel of "int8-rows": FBGEMM where PyTorch has it, else torch._int_mm ("" if neither).
#: FBGEMM is the faster of the two in a GPT-2 124M step (1 thread, beside another process:
#: 27 against 36 ms for one sequence, 43 against 49 ms for eight; docs/performance.md).
ROWS_KERNEL = "fbgemm" if fbgemm_available() else "int_mm" if _HAS_INT_MM else ""


class Int8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 with one fp32 scale per output row."""

    qweight: torch.Tensor  # (out, in) int8, a buffer
    scale: torch.Tensor  # (out,) fp32, a buffer
    bias: torch.Tensor | None  # (out,) fp32, a buffer

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 activations: str = "int8"):
        super().__init__()
        _check_activations(activations)
        q, scale = quantize_rows(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.activations = activations
        # The kernels' pre-arranged copies of the weight, made on first use (see _prepacked)
        self._packs: dict[tuple[str, bool], object] = {}
        self._scale_bf16: torch.Tensor | None = None
        self._row_sums: torch.Tensor | None = None  # (out,) int32 sum_k Q_jk, for "int8-rows"
        self._grid: torch.Tensor | None = None  # (2, in): rows of -128 and 127 (see _int8_rows)

    @classmethod
    def from_linear(cls, layer: nn.Linear, activations: str = "int8") -> Int8Linear:
        return cls(layer.weight, layer.bias, activations)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as floats again: (out, in)."""
        return self.qweight.to(dtype) * self.scale[:, None].to(dtype)

    def _prepacked(self, engine: str = "fbgemm", bias: bool = True) -> object:
        """The weight pre-arranged for one of PyTorch's int8 engines ("fbgemm" or "onednn"),
        with the bias or (for "int8-rows") without. The engine is the one set while packing;
        the product then runs that engine's kernel whatever the global setting."""
        packed = self._packs.get((engine, bias))
        if packed is None:
            global_engine = torch.backends.quantized.engine
            with warnings.catch_warnings():  # quantized-tensor constructors warn of their future
                warnings.simplefilter("ignore")
                qw = _torch_private._make_per_channel_quantized_tensor(
                    self.qweight, self.scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                try:
                    torch.backends.quantized.engine = engine
                    packed = torch.ops.quantized.linear_prepack(qw, self.bias if bias else None)
                finally:
                    torch.backends.quantized.engine = global_engine
            self._packs[(engine, bias)] = packed
        return packed

    def _int8_rows(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b with every row of x rounded to int8 on its own range (see the module
        docstring): exact integer sums, so each output row depends on its input row only."""
        flat = x.reshape(-1, self.in_features).float()  # (rows, in)
        lo, hi = torch.aminmax(flat, dim=1, keepdim=True)  # (rows, 1) each
        lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)  # 0 stays exact
        step = (hi - lo).div_(255).clamp_(min=1e-12)  # (rows, 1)
        zero = (lo / step).round_().add_(128)  # x ~ step * (q + zero), q in [-128, 127]
        q = (flat / step).round_().sub_(zero).clamp_(-128, 127)  # (rows, in) whole numbers
        if self._row_sums is None:
            self._row_sums = self.qweight.sum(dim=1, dtype=torch.int32)  # (out,) sum_k Q_jk
        if ROWS_KERNEL == "int_mm":
            # PyTorch's int8 x int8 -> int32 product (oneDNN's AMX/VNNI kernel on x86), then
            # the zero point's term, still in exact integers.
            acc = _torch_private._int_mm(q.to(torch.int8), self.qweight.t())  # (rows, out)
            y = acc.addcmul_(zero.to(torch.int32), self._row_sums).float().mul_(step)
            # y * scale[j] + b[j] in one pass
            y = y.mul_(self.scale) if self.bias is None else torch.addcmul(self.bias, y,
                                                                            self.scale)
        else:
            # FBGEMM rounds its input on one range for the whole batch; two more rows, all
            # -128 and all 127, pin that range to the integer grid whatever the other rows
            # hold, so q passes unchanged and each row gets FBGEMM's exact int32 sums, times
            # scale[j] (no bias: it is added after the row's step).
            if self._grid is None:
                self._grid = torch.tensor([[-128.0], [127.0]]).expand(2, self.in_features)
            packed = self._prepacked("fbgemm", bias=False)
            out = torch.ops.quantized.linear_dynamic(torch.cat((q, self._grid)), packed,
                                                     False)[:-2]
            y = out.addcmul_(zero, self._row_sums * self.scale).mul_(step)  # (rows, out)
            if self.bias is not None:
                y = y.add_(self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "int8-rows" and x.device.type == "cpu" and ROWS_KERNEL:
            return self._int8_rows(x)
        if self.activations == "int8" and x.device.type == "cpu" and fbgemm_available():
            flat = x.reshape(-1, self.in_features).float()
            # FBGEMM for a few rows (decoding); oneDNN's kernel (AMX on this CPU) from
            # ONEDNN_FROM_ROWS rows on (a prompt, a batch), at the price of a second copy.
            engine = "onednn" if flat.shape[0] >= ONEDNN_FROM_ROWS and onednn_available() \
                else "fbgemm"
            # reduce_range=False: the full 8 bits for the input; the int32 sums of VNNI/AMX
            # (and FBGEMM's 16-bit-safe path on older CPUs) keep the products exact.
            y = torch.ops.quantized.linear_dynamic(flat, self._prepacked(engine), False)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _HAS_INT8PACK:
            # PyTorch's weight-only kernel: int8 rows scaled on the fly, bf16 in and out.
            if self._scale_bf16 is None:
                self._scale_bf16 = self.scale.to(torch.bfloat16)
            y = _torch_private._weight_int8pack_mm(x.reshape(-1, self.in_features),
                                                   self.qweight, self._scale_bf16)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activations={self.activations}")


def quantize_int8(model: nn.Module, activations: str = "int8") -> nn.Module:
    """Replace every nn.Linear of `model` (the output layer included) by an Int8Linear, in place.

    The token embedding keeps its float table (a lookup reads one row, not the whole matrix);
    the output layer, which shares that table in tied models, gets its own int8 copy. Layer
    norms, biases and the attention arithmetic stay in floating point. The result is for
    inference: `qkv.save` refuses it (save the float model instead).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"quantize_int8 needs a model (torch.nn.Module), got "
                         f"{type(model).__name__}")
    _check_activations(activations)  # before the model is touched
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise InputError("the model has no linear layers to quantize (already quantized?)")
    if activations != "float" and next(model.parameters()).dtype != torch.float32:
        model.float()  # the int8 paths round fp32 inputs; the non-linear parts are tiny
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):  # PackedLinear too
                setattr(parent, name, Int8Linear.from_linear(child, activations))
    return model.eval()


class PackedLinear(nn.Linear):
    """An nn.Linear, with the same weight and bias, whose inference products on a CPU read a
    copy of the weight laid out once for the kernel that multiplies it.

    A plain `F.linear` hands oneDNN (bf16) or MKL (fp32) the weight as it is stored, and the
    kernel rearranges it into its own blocked layout at every call: for a decoding step of a
    few rows, reading the weight twice. The packed copy is that layout, made once:

    - bf16: oneDNN's layout (`torch.ops.mkldnn._reorder_linear_weight`, multiplied by
      `torch.ops.mkldnn._linear_pointwise`, the pair PyTorch's own compiler uses for CPU
      inference). Any number of rows; the same numbers as `F.linear` (tested), and a row's
      result does not depend on how many rows share the product.
    - fp32: MKL's layout for exactly `rows` rows (`torch.ops.mkl._mkl_linear`); a product of
      any other number of rows takes `F.linear`. Its sums are ordered differently from
      `F.linear`'s, so it is off unless `rows` is given (the server, whose steps all have the
      same width, asks for it).

    Training never takes the packed path: with gradients on and the weight trainable, the
    layer is a plain nn.Linear. The copy is made at the first packed call and made again when
    the weight changes (its version counter moves), so a model that is trained again stays
    right. The price is a second copy of the weight in memory.
    """

    def __init__(self, layer: nn.Linear, rows: int | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: the parameters are the layer's own, shared
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight, self.bias = layer.weight, layer.bias
        self.rows = rows
        self._packed: torch.Tensor | None = None
        # the weight's address, dtype and version when it was packed
        self._packed_from: tuple[int, torch.dtype, int] | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed copy out (oneDNN's layout has no storage to
        copy); the copy packs its own weight at its first call."""
        state = self.__dict__.copy()
        state["_packed"] = state["_packed_from"] = None
        return state

    def _packed_weight(self) -> torch.Tensor | None:
        """The packed copy for this weight's dtype, (re)made if the weight changed; None where
        no packed kernel serves it."""
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # an inference tensor keeps no version counter
            version = -1
        key = (w.data_ptr(), w.dtype, version)
        if self._packed_from != key:
            self._packed = _pack(w.detach(), self.rows)
            self._packed_from = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != w.dtype
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, self.bias)
        flat = x.reshape(-1, self.in_features)  # (rows, in)
        if w.dtype == torch.float32 and flat.shape[0] != self.rows:
            return F.linear(x, w, self.bias)
        packed = self._packed_weight()
        if packed is None:
            return F.linear(x, w, self.bias)
        if w.dtype == torch.bfloat16:
            y = torch.ops.mkldnn._linear_pointwise(flat, packed, self.bias, "none", [], "")
        else:
            y = torch.ops.mkl._mkl_linear(flat, packed, w, self.bias, flat.shape[0])
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f", fp32 packed for {self.rows} rows"
        return super().extra_repr() + rows


@functools.cache
def _packing_kernels() -> tuple[bool, bool]:
    """(oneDNN's bf16 packed product, MKL's fp32 packed product): which this torch build has.
    bf16 counts only where the CPU computes bf16 natively (AMX or AVX512-BF16)."""
    from .hardware import cpu_has_bf16

    mkldnn = (torch.backends.mkldnn.is_available() and cpu_has_bf16()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    mkl = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    return mkldnn, mkl


def _pack(weight: torch.Tensor, rows: int | None) -> torch.Tensor | None:
    mkldnn, mkl = _packing_kernels()
    if weight.dtype == torch.bfloat16 and mkldnn:
        return torch.ops.mkldnn._reorder_linear_weight(weight)
    if weight.dtype == torch.float32 and mkl and rows is not None:
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return None


def pack_linears(model: nn.Module, rows: int | None = None) -> nn.Module:
    """Swap every nn.Linear of `model` for a PackedLinear, in place: faster inference on a CPU,
    above all for decoding (a step multiplies every weight by a few rows, and the time goes
    into reading weights). bf16 weights are packed for any number of rows; fp32 weights only
    when `rows` is given, for products of exactly that many rows. Weights, ties and results
    stay the same (fp32 with `rows`: the same up to the order of the sums)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, rows))
            elif isinstance(child, PackedLinear):
                child.rows, child._packed_from = rows, None
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
