"""The codecs alone: unbiased ones average to what they encode, with the variance
their formula gives; shared randomness regenerates on the receiving end; the bytes
are the bytes of the parts; error feedback keeps exactly what was not sent; a
hostile encoding is named, never decoded."""

import math

import pytest
import torch

from fedssl.codecs.base import numel
from fedssl.codecs.pipeline import Pipeline, array_seed, decode_arrays, encode_arrays
from fedssl.codecs.sketched import pack, unpack
from fedssl.codecs.sparse import random_positions
from fedssl.config.schema import CodecConfig
from fedssl.config.validate import codec_stages
from fedssl.messages import array_bytes

DRAWS = 2000  # encodings averaged per test: the mean's standard error is sqrt(variance / DRAWS)


def pipeline(*entries: dict) -> Pipeline:
    return Pipeline(codec_stages([CodecConfig(**entry) for entry in entries], "codecs"))


def draws(codec: Pipeline, x: torch.Tensor, count: int = DRAWS) -> torch.Tensor:
    """`count` decodings of `x`, each under its own seeds (as over rounds or clients)."""
    out = []
    for i in range(count):
        seeds = [array_seed(0, i, 0, 1, "w", stage) for stage in range(len(codec.codecs))]
        out.append(codec.decode(codec.encode(x, seeds), tuple(x.shape), seeds))
    return torch.stack(out).double()


def quantize_variance(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Var of b-bit stochastic quantization per coordinate: d^2 f (1 - f), d the level
    spacing over [min, max], f the coordinate's fractional position between levels;
    and the standard error of a sample variance of DRAWS such two-point draws,
    sqrt((mu4 - var^2) / DRAWS), mu4 = d^4 f (1 - f) (1 - 3f + 3f^2)."""
    lo, hi = x.min().double(), x.max().double()
    step = (hi - lo) / (2**bits - 1)
    position = (x.double() - lo) / step
    f = position - position.floor()
    variance = step**2 * f * (1 - f)
    mu4 = step**4 * f * (1 - f) * (1 - 3 * f + 3 * f**2)
    # near f = 1/2 that first-order error vanishes and the next one, of order d^2 / DRAWS, remains
    return variance, ((mu4 - variance**2).clamp(min=0) / DRAWS).sqrt() + step**2 / DRAWS


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("entries", [
    [{"name": "identity"}],
    [{"name": "subsample", "fraction": 0.25}],
    [{"name": "quantize", "bits": 1}],
    [{"name": "quantize", "bits": 2}],
    [{"name": "hadamard"}, {"name": "quantize", "bits": 2}],
    [{"name": "hadamard"}, {"name": "subsample", "fraction": 0.5}, {"name": "quantize", "bits": 4}],
], ids=lambda e: "+".join(f"{c['name']}{c.get('bits', c.get('fraction', ''))}" for c in e))
def test_unbiased_codecs_average_to_what_they_encode(entries):
    codec = pipeline(*entries)
    assert codec.unbiased
    decoded = draws(codec, X, DRAWS // 2)
    # Each coordinate's mean is within 5 standard errors of x (its empirical std / sqrt(draws)),
    # plus float32 rounding: a biased codec (e.g. the unscaled mask) fails this by far.
    tolerance = 5 * decoded.std(dim=0) / math.sqrt(len(decoded)) + 1e-5
    assert bool(((decoded.mean(dim=0) - X.double()).abs() <= tolerance).all())


def test_the_unscaled_random_mask_is_biased_and_the_check_above_would_say_so():
    decoded = draws(pipeline({"name": "mask", "fraction": 0.25}), X, 400)
    assert torch.allclose(decoded.mean(dim=0), 0.25 * X.double(), atol=0.15)  # E = fraction * x, not x


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantization_variance_matches_its_formula(bits):
    decoded = draws(pipeline({"name": "quantize", "bits": bits}), X)
    want, standard_error = quantize_variance(X, bits)
    # per coordinate, within 5 standard errors of the sample variance (+ float32 rounding)
    assert bool(((decoded.var(dim=0) - want).abs() <= 5 * standard_error + 1e-6).all())
    assert decoded.var(dim=0).sum().item() == pytest.approx(want.sum().item(), rel=0.05)


def test_subsampling_variance_matches_its_formula():
    fraction = 0.25
    decoded = draws(pipeline({"name": "subsample", "fraction": fraction}), X)
    n = X.numel()
    k = math.ceil(fraction * n)
    want = X.double() ** 2 * (n / k - 1)  # k of n kept (probability k / n), scaled by n / k
    # each coordinate is a two-point law too: x n / k with probability q = k / n, else 0;
    # its sample variance's standard error is sqrt((mu4 - var^2) / DRAWS)
    q = k / n
    mu4 = X.double() ** 4 * (q * (1 / q - 1) ** 4 + (1 - q))
    standard_error = ((mu4 - want**2) / DRAWS).sqrt()
    assert bool(((decoded.var(dim=0) - want).abs() <= 5 * standard_error + 1e-6).all())
    assert decoded.var(dim=0).sum().item() == pytest.approx(want.sum().item(), rel=0.05)


def test_the_rotation_is_orthonormal_and_exactly_undone():
    codec = pipeline({"name": "hadamard"})
    x = torch.randn(3, 1000)
    parts = codec.encode(x, [11])
    assert parts["values"].numel() == 4096  # padded to a whole block
    assert parts["values"].norm().item() == pytest.approx(x.norm().item(), rel=1e-5)
    torch.testing.assert_close(codec.decode(parts, (3, 1000), [11]), x, atol=1e-5, rtol=1e-5)


def test_the_random_mask_regenerates_on_the_receiving_end_from_the_seed_alone():
    codec = pipeline({"name": "mask", "fraction": 0.1})
    x = torch.randn(40, 25)
    seed = array_seed(7, 3, 2, 1, "conv.weight", 0)
    parts = codec.encode(x, [seed])
    assert list(parts) == ["values"] and parts["values"].numel() == 100  # only the values travel
    # the receiver, another object, draws the same positions from the same seed
    receiver = pipeline({"name": "mask", "fraction": 0.1})
    decoded = receiver.decode({"values": parts["values"].clone()}, (40, 25), [seed])
    positions = random_positions(1000, 100, seed)
    assert torch.equal(positions, random_positions(1000, 100, seed))
    kept = torch.zeros(1000, dtype=torch.bool)
    kept[positions] = True
    assert torch.equal(decoded.reshape(-1)[kept], x.reshape(-1)[kept])
    assert not decoded.reshape(-1)[~kept].any()
    # another seed (round, client or array) draws other positions
    assert not torch.equal(positions, random_positions(1000, 100, array_seed(7, 4, 2, 1, "conv.weight", 0)))


def test_low_rank_sends_one_factor_and_rebuilds_the_projection():
    codec = pipeline({"name": "low_rank", "rank": 2})
    h = torch.randn(32, 2) @ torch.randn(2, 20)  # a rank-2 delta
    parts = codec.encode(h, [5])
    assert parts["values"].numel() == 2 * 20  # k x the shorter side
    decoded = codec.decode(parts, (32, 20), [5])
    # a projection: decoding it again changes nothing, and it never lengthens the delta
    again = codec.decode(codec.encode(decoded, [5]), (32, 20), [5])
    torch.testing.assert_close(again, decoded, atol=1e-5, rtol=1e-5)
    assert decoded.norm() <= h.norm() + 1e-4
    bias = torch.randn(7)
    assert torch.equal(codec.decode(codec.encode(bias, [5]), (7,), [5]), bias)  # a 1-D array travels whole


def test_packing_holds_8_over_b_levels_per_byte():
    for bits in (1, 2, 4, 8):
        levels = torch.randint(0, 2**bits, (37,), dtype=torch.int32)
        packed = pack(levels, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * bits / 8)
        assert torch.equal(unpack(packed, bits, 37), levels)


@pytest.mark.parametrize("entries, want", [
    ([{"name": "quantize", "bits": 2}], lambda n: math.ceil(n / 4) + 8),  # packed levels + lo, hi as float32
    ([{"name": "topk", "fraction": 0.1}], lambda n: 8 * math.ceil(0.1 * n)),  # int32 index + float32 value
    ([{"name": "mask", "fraction": 0.1}], lambda n: 4 * math.ceil(0.1 * n)),  # values only
    ([{"name": "identity"}], lambda n: 4 * n),
])
def test_encoded_bytes_are_the_bytes_of_the_parts_sent(entries, want, over_flower_wire):
    from fedssl.backends.flower.codec import decode_update, encode_update
    from fedssl.messages import Update

    codec = pipeline(*entries)
    arrays = {"a.weight": torch.randn(10, 30), "a.bias": torch.randn(10), "count": torch.tensor(3)}
    encoded = encode_arrays(arrays, codec, lambda name: [1] * len(codec.codecs))
    assert array_bytes(encoded) == want(300) + want(10) + 8  # the int64 counter travels as it is
    # what Flower carries: the same arrays, the same bytes
    update = Update(0, encoded, 5)
    received = decode_update(over_flower_wire(encode_update(update)))
    assert received.num_bytes == update.num_bytes
    record = encode_update(update).array_records["arrays"]
    assert sum(array.numpy().nbytes for array in record.values()) == update.num_bytes


def test_error_feedback_keeps_exactly_what_was_not_sent():
    from fedssl.codecs.links import RESIDUAL, Links
    from fedssl.messages import Update

    links = Links(0, pipeline({"name": "topk", "fraction": 0.25}), Pipeline([]))
    sent_weights = {"w": torch.zeros(4, 4)}
    kept: dict = {}
    total_sent, previous = torch.zeros(4, 4), torch.zeros(4, 4)
    deltas = [torch.randn(4, 4, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    for round_index, delta in enumerate(deltas, start=1):
        update = Update(1, {"w": sent_weights["w"] + delta}, 10)
        encoded, kept = links.send_update(update, sent_weights, round_index, kept)
        decoded, problem = links.open_update(encoded, sent_weights, round_index, 1)
        assert problem is None
        residual = kept[RESIDUAL + "w"]
        meant = delta + previous
        # the residual is what was meant (this delta plus the last residual) minus what the server decoded
        torch.testing.assert_close(residual, meant - decoded.arrays["w"])
        assert int((decoded.arrays["w"] != 0).sum()) == 4  # a quarter of 16 coordinates was sent
        assert not residual[decoded.arrays["w"] != 0].any()  # the sent ones are not carried over
        total_sent += decoded.arrays["w"]
        previous = residual
    # nothing is lost: what was sent plus what is kept is the sum of every delta
    torch.testing.assert_close(total_sent + previous, sum(deltas), atol=1e-6, rtol=1e-6)


def hostile(parts: dict, key: str, value) -> dict:
    return {**parts, key: value}


@pytest.mark.parametrize("entries, tamper, why", [
    ([{"name": "topk", "fraction": 0.1}], lambda p: hostile(p, "w/0.index", p["w/0.index"] + 1000), "index out of range"),
    ([{"name": "topk", "fraction": 0.1}], lambda p: hostile(p, "w/0.index", p["w/0.index"].flip(0)), "strictly increasing"),
    ([{"name": "topk", "fraction": 0.1}], lambda p: hostile(p, "w/0.index", p["w/0.index"].long()), "is int64"),
    ([{"name": "quantize", "bits": 2}], lambda p: hostile(p, "w/0.levels", p["w/0.levels"].to(torch.int16)), "is int16"),
    ([{"name": "quantize", "bits": 2}], lambda p: hostile(p, "w/0.levels", torch.zeros(75, dtype=torch.uint8)), r"\(75,\), expected uint8 \(25,\)"),
    ([{"name": "quantize", "bits": 2}], lambda p: hostile(p, "w/0.range", torch.tensor([1.0, float("inf")])), "non-finite"),
    ([{"name": "quantize", "bits": 2}], lambda p: hostile(p, "w/0.range", torch.tensor([1.0, -1.0])), "lo <= hi"),
    ([{"name": "mask", "fraction": 0.1}], lambda p: hostile(p, "w/values", torch.zeros(11)), "expected float32"),
    ([{"name": "mask", "fraction": 0.1}], lambda p: {k: v for k, v in p.items() if k != "w/values"}, "missing"),
    ([{"name": "mask", "fraction": 0.1}], lambda p: hostile(p, "w/extra", torch.zeros(1)), "unexpected"),
    ([{"name": "mask", "fraction": 0.1}], lambda p: hostile(p, "v/values", torch.zeros(1)), "unexpected array 'v/values'"),
])
def test_a_hostile_encoding_is_named_and_never_decoded(entries, tamper, why):
    codec = pipeline(*entries)
    reference = {"w": torch.zeros(100)}
    seeds = lambda name: [3] * len(codec.codecs)
    parts = encode_arrays({"w": torch.randn(100)}, codec, seeds)
    assert decode_arrays(parts, reference, codec, seeds)[1] is None
    decoded, problem = decode_arrays(tamper(parts), reference, codec, seeds)
    assert decoded == {} and problem is not None
    assert __import__("re").search(why, problem), problem


def test_numel_of_a_scalar_shape():
    assert numel(()) == 1 and numel((3, 4)) == 12
