"""The native kernels' linear layers (`linear.c`, `bf16linear.c`, `qlinear.c`): each over a weight packed at load
for it, float32 activations in and out. See `models.native` for how the kernels are built and why every row's
outputs are the same bits whatever the other rows."""
import ctypes

import torch
import torch.nn.functional as F

# The kernels' return codes (enum in kernels.h): a fresh exception each time, so that tracebacks do not pile up
# on one shared instance.
_FAILURES = {1: (MemoryError, "a native kernel: out of memory for its work space"),
             2: (ValueError, "paged attention: a context length outside 1 .. the block table's capacity"),
             3: (ValueError, "paged attention: a block id outside the KV cache"),
             4: (ValueError, "decoder layer: a cache slot outside the KV cache"),
             5: (ValueError, "paged attention: query starts that do not run from 0 up to the number of queries, or "
                             "a sequence with more queries than its context length")}


def raise_for(status: int) -> None:
    if status:
        kind, message = _FAILURES[status]
        raise kind(message)


def _bias_fits(bias: torch.Tensor | None, n: int) -> bool:
    return bias is None or (bias.dtype == torch.float32 and bias.is_cpu and bias.shape == (n,) and bias.is_contiguous())


def _refuse(kernel: str, packed_for: str, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    raise ValueError(f"the {kernel} on the CPU over a contiguous weight packed for {packed_for}; got x "
                     f"{tuple(x.shape)} {x.dtype}, weight {tuple(packed.shape)} {packed.dtype}, "
                     f"bias {None if bias is None else tuple(bias.shape)}")


def _rows_through(run, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None, *options):
    """out [..., n] from run(x, rows, k, packed, *options, n, bias, out, threads), a kernel that returns a status."""
    k = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    raise_for(run(x.data_ptr(), x.numel() // k if k else 0, k, packed.data_ptr(), *options, n,
                  None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads()))
    return out


class LinearKernel:
    """(x [..., k], packed weight, bias [n] or None, n) -> x · weightᵀ + bias [..., n], as F.linear, over a
    weight that `pack` laid out in column panels at load. Every row's outputs are the same bits whatever the
    other rows: any number of rows runs here, never through MKL's sgemm, whose rounding depends on the number."""

    def __init__(self, library: ctypes.CDLL):
        self._run = library.linear
        self._run.restype = None
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.panel = library.linear_panel_width()

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """[n, k] -> [ceil(n / panel), k, panel]: each panel holds `panel` output columns, row by row of k."""
        n, k = weight.shape
        padded = torch.zeros(-(-n // self.panel) * self.panel, k, dtype=weight.dtype)
        padded[:n] = weight
        return padded.view(-1, self.panel, k).transpose(1, 2).contiguous()

    @staticmethod
    def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
        return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:n]

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        # Every layer calls this once per step: the checks are plain comparisons (a loop over the tensors and
        # `.device.type` made the call 15 us instead of 8, a millisecond of a one-token step).
        k = x.shape[-1]
        if x.dtype != torch.float32 or not x.is_cpu or packed.dtype != torch.float32 or not packed.is_cpu \
                or packed.shape != (-(-n // self.panel), k, self.panel) or not packed.is_contiguous() \
                or not _bias_fits(bias, n):
            _refuse("linear kernel runs float32", f"{n} outputs of {k} inputs", x, packed, bias)
        if k == 0:  # no inputs: the bias (or zeros) for every row
            return F.linear(x, self.unpack(packed, n), bias)
        rows = x.numel() // k
        x = x.contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
        self._run(x.data_ptr(), rows, k, packed.data_ptr(), n, None if bias is None else bias.data_ptr(),
                  out.data_ptr(), torch.get_num_threads())
        return out


class QuantizedLinearKernel:
    """(x [..., k], packed weight, bias [n] or None, n) -> x · weightᵀ + bias [..., n] over a weight quantized in
    blocks of 32 inputs (see `models.quant`), with each row of x quantized per block of 32 to int8: integer dot
    products (AVX-512 VNNI, AVX-VNNI, AVX2 or plain C, as the machine has), summed over the blocks in float."""

    def __init__(self, library: ctypes.CDLL):
        self._run = library.qlinear
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        library.qlinear_block_bytes.restype = ctypes.c_int64
        self._bits = {library.qlinear_block_bytes(bits): bits for bits in (8, 4)}
        library.qlinear_path.restype = ctypes.c_char_p
        self.path = library.qlinear_path().decode()  # the integer dot products this machine runs

    def bits(self, packed: torch.Tensor) -> int:
        return self._bits[packed.shape[-1]]

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        k = x.shape[-1]
        if x.dtype != torch.float32 or not x.is_cpu or packed.dtype != torch.uint8 or packed.dim() != 3 \
                or packed.shape[:2] != (-(-n // 16), k // 32) or k % 32 or packed.shape[-1] not in self._bits \
                or not packed.is_contiguous() or not _bias_fits(bias, n):
            _refuse("quantized linear kernel runs float32", f"{n} outputs of {k} inputs (a multiple of 32)", x, packed,
                    bias)
        return _rows_through(self._run, x, packed, n, bias, self.bits(packed))


class Bf16LinearKernel:
    """(x [..., k], packed weight, bias [n] or None, n) -> x · weightᵀ + bias [..., n] over a weight rounded to
    bfloat16 at load, with each row of x rounded to bfloat16 and the products summed in float32: `vdpbf16ps` where
    the CPU has AVX-512 BF16, the same arithmetic widened to float32 elsewhere."""
    columns = 16  # a panel's outputs (BCOLS)

    def __init__(self, library: ctypes.CDLL):
        self._run = library.bf16linear
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        library.bf16linear_path.restype = ctypes.c_char_p
        self.path = library.bf16linear_path().decode()

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """[n, k] -> [ceil(n / 16), ceil(k / 2), 32] bfloat16: each panel's 16 outputs, a pair of inputs at a time."""
        n, k = weight.shape
        padded = torch.zeros(-(-n // self.columns) * self.columns, k + k % 2, dtype=torch.bfloat16)
        padded[:n, :k] = weight
        return padded.view(-1, self.columns, padded.shape[1] // 2, 2).transpose(1, 2).flatten(2).contiguous()

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        k = x.shape[-1]
        if x.dtype != torch.float32 or not x.is_cpu or packed.dtype != torch.bfloat16 or not packed.is_cpu \
                or packed.shape != (-(-n // self.columns), -(-k // 2), 2 * self.columns) \
                or not packed.is_contiguous() or not _bias_fits(bias, n):
            _refuse("bfloat16 linear kernel runs float32 activations", f"{n} outputs of {k} inputs", x, packed, bias)
        return _rows_through(self._run, x, packed, n, bias)
