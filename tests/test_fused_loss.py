"""The fused output layer + loss gives F.cross_entropy's numbers, and does no gradient work when off."""

import platform
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanogpt_lightning.model import fused_loss
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.fused_loss import (
    CHUNK_BYTES,
    default_chunk_rows,
    fused_linear_cross_entropy,
    matmul,
)
from nanogpt_lightning.model.gpt import GPT
from test_model import OPTION_SETS

X86_ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def reference(hidden, weight, targets, softcap=None):
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64])
def test_gradcheck_float64_with_ignored_rows(chunk_rows, softcap):
    torch.manual_seed(0)
    hidden = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (10,))
    targets[[2, 7]] = -1
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_cross_entropy(h, w, targets, chunk_rows, softcap), (hidden, weight)
    )
    torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets, chunk_rows, softcap),
                               reference(hidden, weight, targets, softcap))


@pytest.mark.parametrize("chunk_rows, softcap", [(None, None), (200, None), (None, 2.0)])
def test_float32_matches_cross_entropy_on_a_gpt2_sized_output_layer(chunk_rows, softcap):
    """Soft-capped too, in 4 default chunks of 128 rows (raw logits ~ N(0, 0.8^2), the largest twice the cap)."""
    torch.manual_seed(0)
    hidden = torch.randn(512, 64)
    weight = torch.randn(50304, 64) * 0.1
    targets = torch.randint(0, 50257, (512,))
    targets[::9] = -1
    results = []
    uncapped = lambda h, w, t: reference(h, w, t, softcap)  # noqa: E731
    fused = lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_rows, softcap)  # noqa: E731
    for loss_fn in (uncapped, fused):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, w, targets)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_loss_stays_exact_where_the_target_probability_underflows_float32():
    """A target 200 logits below the best has probability e^-200: 0 in float32, yet its loss is finite."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 3.0]], requires_grad=True)
    targets = torch.tensor([1, 2])
    loss = fused_linear_cross_entropy(hidden, weight, targets)
    expected = reference(hidden, weight, targets)
    assert loss.isfinite() and loss.item() > 100
    torch.testing.assert_close(loss, expected)


def test_default_chunks_stay_under_the_byte_budget_and_are_even():
    row_bytes = 50304 * 4
    assert default_chunk_rows(512, 50304) == 256  # an m2_shakespeare micro-batch: two halves
    n_rows, most = 12 * 1024, CHUNK_BYTES // row_bytes
    rows = default_chunk_rows(n_rows, 50304)
    assert rows <= most and -(-n_rows // rows) == -(-n_rows // most)  # within budget, no more chunks than needed
    assert default_chunk_rows(12 * 64, 65) == 12 * 64  # a macbook_char batch in one chunk
    assert default_chunk_rows(7, 10**9) == 1
    # soft-capping with gradients keeps two blocks per chunk: half the rows, the same bytes
    assert default_chunk_rows(512, 50304, bytes_per_logit=8) == 128
    rows = default_chunk_rows(n_rows, 50304, bytes_per_logit=8)
    assert 2 * rows * row_bytes <= CHUNK_BYTES and -(-n_rows // rows) == -(-n_rows // (most // 2))


def mm_left_shapes(monkeypatch) -> list:
    """The shapes of the left operands of every torch.mm from now on (the logits matmul is one per chunk)."""
    shapes = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: shapes.append(a[0].shape) or real_mm(*a, **k))
    return shapes


@pytest.mark.parametrize("softcap, grad, chunk", [(None, True, 4), (2.0, False, 4), (2.0, True, 2)],
                         ids=["uncapped", "softcap without grad", "softcap with grad"])
def test_soft_capping_with_gradients_halves_the_default_chunk(monkeypatch, softcap, grad, chunk):
    """Its second (rows x vocab) buffer counts against CHUNK_BYTES; without gradients it needs none."""
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 4 * 10 * 4)  # four float32 rows of a vocabulary of 10
    hidden = torch.randn(12, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    targets = torch.randint(0, 10, (12,))
    matmuls = mm_left_shapes(monkeypatch)
    with torch.set_grad_enabled(grad):
        loss = fused_linear_cross_entropy(hidden, weight, targets, softcap=softcap)
    assert matmuls.count((chunk, 4)) == 12 // chunk  # the logits of each chunk
    torch.testing.assert_close(loss, reference(hidden, weight, targets, softcap))


def test_all_rows_ignored_gives_nan_like_cross_entropy():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    targets = torch.full((4,), -1)
    assert fused_linear_cross_entropy(hidden, weight, targets).isnan()
    assert reference(hidden, weight, targets).isnan()


def test_one_valid_row_is_its_own_loss_and_gradient():
    """The mean over valid rows when there is one (mutation testing found the count of 1 untested)."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([-1, 3, -1, -1])
    results = []
    for loss_fn in (reference, fused_linear_cross_entropy):
        h = hidden.clone().requires_grad_()
        loss = loss_fn(h, weight, targets)
        loss.backward()
        results.append((loss.detach(), h.grad))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("softcap", [0, -1.0, float("nan")])
def test_a_softcap_that_is_not_positive_is_refused(softcap):
    hidden, weight, targets = torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=rf"^softcap must be a positive number or None, got {softcap}$"):
        fused_linear_cross_entropy(hidden, weight, targets, softcap=softcap)
    small = fused_linear_cross_entropy(hidden, weight, targets, softcap=0.5)  # a cap below 1 is a cap
    torch.testing.assert_close(small, reference(hidden, weight, targets, 0.5))


def test_no_gradient_work_without_grad(monkeypatch):
    """Under no_grad (evaluation) the loss is a plain tensor and no gradient buffer is ever made."""
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    targets = torch.randint(0, 9, (6,))
    matmuls = mm_left_shapes(monkeypatch)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    assert not loss.requires_grad and loss.grad_fn is None
    assert matmuls == [(4, 4), (2, 4)]  # the logits of each chunk, no gradient matmul
    torch.testing.assert_close(loss, reference(hidden, weight, targets))


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_gpt_gradients_equal_with_fused_loss_on_and_off(options):
    """Every model option, tied and untied output layer, soft-capped logits (cap 5) included."""
    torch.manual_seed(0)
    idx = torch.randint(0, 37, (3, 8))
    targets = torch.randint(0, 37, (3, 8))
    targets[0, :2] = -1
    grads = []
    for fused in (False, True):
        torch.manual_seed(1)
        model = GPT(GPTConfig(block_size=8, vocab_size=37, n_layer=2, n_head=2, n_embd=16,
                              vocab_multiple=8, fused_loss=fused, **options)).double()
        with torch.no_grad():  # the same noise for both: zero-initialised layers get gradients everywhere
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        _, loss = model(idx, targets)
        loss.backward()
        assert (model.lm_head.weight is model.transformer.wte.weight) == options.get("tie_embeddings", True)
        grads.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = grads
    torch.testing.assert_close(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], msg=name)


def test_matmul_goes_through_onednn_on_x86_cpus_and_equals_the_product():
    if X86_ONEDNN:
        # the faster path is really the one taken here: the real op passes its self-check
        assert fused_loss.onednn_in_use(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(256, 50304), dim=1)
    weight = torch.randn(50304, 64) * 0.1
    expected = p.double() @ weight.double()
    got = matmul(p, weight)
    assert got.dtype == torch.float32 and got.shape == (256, 64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    # other dtypes take torch.mm
    torch.testing.assert_close(matmul(p.double(), weight.double()), expected)


@pytest.fixture
def fresh_self_check():
    """The oneDNN self-check runs again in the test, and again (unpatched) after it."""
    fused_loss._onednn_linear.cache_clear()
    yield
    fused_loss._onednn_linear.cache_clear()


def raises_type_error(*args):
    raise TypeError("_linear_pointwise() takes 4 positional arguments but 6 were given")


def wrong_product(a, weight, *args):
    return a @ weight.t() + 1.0


@pytest.mark.parametrize("broken_op", [
    None,
    pytest.param(raises_type_error, marks=pytest.mark.skipif(not X86_ONEDNN, reason="oneDNN is tried on x86 only")),
    pytest.param(wrong_product, marks=pytest.mark.skipif(not X86_ONEDNN, reason="oneDNN is tried on x86 only")),
], ids=["missing", "raises TypeError", "wrong result"])
def test_a_broken_onednn_op_falls_back_to_torch_mm(monkeypatch, fresh_self_check, broken_op):
    calls = []
    namespace = SimpleNamespace()
    if broken_op is not None:
        namespace._linear_pointwise = lambda *args: calls.append(len(args)) or broken_op(*args)
    monkeypatch.setattr(torch.ops, "mkldnn", namespace)

    assert not fused_loss.onednn_in_use(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    p, weight = torch.softmax(torch.randn(32, 300), dim=1), torch.randn(300, 16)
    assert torch.equal(matmul(p, weight), p @ weight)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.1).requires_grad_()
    targets = torch.randint(0, 300, (40,))
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    loss.backward()
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = reference(h, w, targets)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, h.grad)
    torch.testing.assert_close(weight.grad, w.grad)
    # the op was tried once, by the self-check, and never again (the loss made two P @ W products)
    assert calls == ([] if broken_op is None else [6])


def autocast_case(seed=0, n_rows=96, n_embd=32, vocab=300):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, n_embd, generator=generator)
    weight = torch.randn(vocab, n_embd, generator=generator) * 0.3
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)
    targets[[3, 50]] = -1
    return hidden, weight, targets


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_under_autocast_value_and_gradients_match_float32_within_the_low_precision(low, softcap):
    """Matmuls in the low precision, the rest in float32: the loss within 0.05 low-precision epsilons of the
    float32 one and the gradients within 0.35 (measured: 0.007 and 0.27; all in the low precision: 0.4-0.7 and
    0.5-0.6, so a softmax or loss sum in the low precision fails this)."""
    hidden, weight, targets = autocast_case()
    results = {}
    for name in ("float32", "autocast"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=low, enabled=name == "autocast"):
            loss = fused_linear_cross_entropy(h, w, targets, chunk_rows=40, softcap=softcap)
        loss.backward()
        results[name] = (loss, h.grad, w.grad)
    (loss32, gh32, gw32), (loss, gh, gw) = results["float32"], results["autocast"]
    assert loss.dtype == gh.dtype == gw.dtype == torch.float32
    eps = torch.finfo(low).eps
    assert abs(loss - loss32) / loss32 < 0.05 * eps
    for got, expected in ((gh, gh32), (gw, gw32)):
        error = (got - expected).norm() / expected.norm()
        assert error < 0.35 * eps, f"relative gradient error {error / eps:.2f} eps"
    torch.testing.assert_close(loss32, reference(hidden, weight, targets, softcap))


def test_under_autocast_it_is_autocasts_own_linear_and_cross_entropy_but_in_chunks():
    """Same rounding as the unfused model under autocast (a bf16 Linear, then cross-entropy in float32)."""
    hidden, weight, targets = autocast_case(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=40)
        unfused = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-1)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_under_autocast_matmuls_take_low_precision_inputs_and_no_full_float32_logits(monkeypatch):
    """Every matmul gets bfloat16 operands; a chunk's buffers (float32 block + bfloat16 copy, 6 bytes a
    logit) stay within CHUNK_BYTES, so the rows come in chunks of CHUNK_BYTES // (6 x vocab)."""
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 6 * 300 * 16)  # 16 rows of a 300-token vocabulary
    hidden, weight, targets = autocast_case()
    hidden.requires_grad_(), weight.requires_grad_()
    operands = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **k: operands.append((a.shape, a.dtype, b.dtype))
                        or real_mm(a, b, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_linear_cross_entropy(hidden, weight, targets).backward()
    assert [shape for shape, *_ in operands].count((16, 32)) == 96 // 16  # the logits, chunk by chunk
    assert {(a, b) for _, a, b in operands} == {(torch.bfloat16, torch.bfloat16)}
