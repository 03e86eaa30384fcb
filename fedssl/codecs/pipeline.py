"""A pipeline of codecs, and whole updates through it.

`Pipeline` chains codecs (e.g. hadamard -> subsample -> quantize) over one array;
`encode_arrays` / `decode_arrays` take every array of an update: each floating
array becomes parts named `NAME/<stage>.<part>` plus `NAME/values` (the last
stage's carry, float32), and integer arrays (BatchNorm's counters) travel as they
are. What a receiver decodes is untrusted: `Pipeline.problem` checks the parts'
names, shapes and dtypes against what the pipeline sends for the array's shape,
and each codec's own checks (indices in range, a finite range), before decoding.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch

from fedssl.codecs.base import Codec, Layout, numel
from fedssl.messages import Arrays

VALUES = "values"  # the part holding the last stage's carry


def array_seed(seed: int, round_index: int, client_id: int, direction: int, name: str, stage: int) -> int:
    """The seed of one stage of one array's encoding: a function of (run seed, round,
    client, direction, array name, stage) that both ends compute, so nothing of it travels."""
    key = [seed, round_index, client_id + 1, direction, zlib.crc32(name.encode()), stage]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


class Pipeline:
    """Codecs applied in order to one array; decoded in reverse."""

    def __init__(self, codecs: Sequence[Codec]):
        self.codecs = list(codecs)

    def __bool__(self) -> bool:
        return bool(self.codecs)

    @property
    def error_feedback(self) -> bool:
        """Whether the sender keeps what it did not send (a stateful stage)."""
        return any(not codec.stateless for codec in self.codecs)

    @property
    def elementwise(self) -> bool:
        """Whether each coordinate travels as one float32 value in place (no codec, or identity)."""
        return all(codec.name == "identity" for codec in self.codecs)

    @property
    def unbiased(self) -> bool:
        return all(codec.unbiased for codec in self.codecs)

    def shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Each stage's input shape: the array's own for the first, flat after."""
        shapes = [shape]
        for codec in self.codecs[:-1]:
            length, _ = codec.layout(shapes[-1])
            shapes.append((length,))
        return shapes

    def layout(self, shape: tuple[int, ...]) -> Layout:
        """Every part sent for an array of `shape`, by name."""
        parts: Layout = {}
        length: int | None = numel(shape)
        for stage, (codec, stage_shape) in enumerate(zip(self.codecs, self.shapes(shape))):
            length, own = codec.layout(stage_shape)
            parts |= {f"{stage}.{part}": spec for part, spec in own.items()}
        if length is not None:
            parts[VALUES] = ((length,), torch.float32)
        return parts

    def encode(self, x: torch.Tensor, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """The parts of `x` (any shape; encoded as float32)."""
        carry: torch.Tensor | None = x.detach().to(torch.float32).reshape(-1)
        parts = {}
        for stage, (codec, shape, seed) in enumerate(zip(self.codecs, self.shapes(tuple(x.shape)), seeds)):
            carry, own = codec.encode(carry, shape, seed)
            parts |= {f"{stage}.{part}": value for part, value in own.items()}
        if carry is not None:
            parts[VALUES] = carry.contiguous()
        return parts

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor:
        """The float32 estimate of the encoded array, of `shape`."""
        carry = parts.get(VALUES)
        shapes = self.shapes(shape)
        for stage in reversed(range(len(self.codecs))):
            own = {key.split(".", 1)[1]: value for key, value in parts.items() if key.startswith(f"{stage}.")}
            carry = self.codecs[stage].decode(carry, own, shapes[stage], seeds[stage])
        return carry.reshape(shape)

    def problem(self, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> str | None:
        """Why `parts` are not what this pipeline sends for an array of `shape`, or None."""
        expected = self.layout(shape)
        missing, extra = sorted(set(expected) - set(parts)), sorted(set(parts) - set(expected))
        if missing or extra:
            return f"parts {extra or missing} {'unexpected' if extra else 'missing'} (expected {sorted(expected)})"
        for key, (want_shape, dtype) in expected.items():
            value = parts[key]
            if not isinstance(value, torch.Tensor):
                return f"part {key!r} is a {type(value).__name__}, not a tensor"
            if tuple(value.shape) != want_shape or value.dtype != dtype:
                return (f"part {key!r} is {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}, expected "
                        f"{str(dtype).removeprefix('torch.')} {want_shape}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"non-finite values in part {key!r}"
        for stage, (codec, stage_shape) in enumerate(zip(self.codecs, self.shapes(shape))):
            own = {key.split(".", 1)[1]: value for key, value in parts.items() if key.startswith(f"{stage}.")}
            why = codec.check(own, stage_shape)
            if why:
                return f"stage {stage} ({codec.name}): {why}"
        return None


def encode_arrays(arrays: Arrays, pipeline: Pipeline, seeds) -> Arrays:
    """Every floating array of `arrays` through `pipeline` (`seeds(name)`: its stages'
    seeds), as parts `NAME/<part>`; other arrays as they are."""
    out = {}
    for name, value in arrays.items():
        if value.is_floating_point():
            out |= {f"{name}/{part}": encoded for part, encoded in pipeline.encode(value, seeds(name)).items()}
        else:
            out[name] = value
    return out


def split_parts(received: Arrays, reference: Arrays) -> tuple[dict[str, dict[str, torch.Tensor]], str | None]:
    """The received parts grouped by the reference array they belong to, or why not."""
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in reference if reference[name].is_floating_point()}
    for key, value in received.items():
        if key in reference and not reference[key].is_floating_point():
            continue
        name, _, part = key.rpartition("/")
        if name not in grouped:
            return grouped, f"unexpected array {key!r} (no array {name!r} is encoded)"
        grouped[name][part] = value
    return grouped, None


def decode_arrays(received: Arrays, reference: Arrays, pipeline: Pipeline, seeds) -> tuple[Arrays, str | None]:
    """The decoded arrays (each floating one: its decoded delta, float32) of what
    `encode_arrays` sent for arrays shaped as `reference`, or ({}, why they cannot be
    decoded). Integer arrays are passed on for the update's own checks."""
    grouped, problem = split_parts(received, reference)
    if problem:
        return {}, problem
    out = {}
    for name, parts in grouped.items():
        shape = tuple(reference[name].shape)
        problem = pipeline.problem(parts, shape)
        if problem:
            return {}, f"array {name!r}: {problem}"
        out[name] = pipeline.decode(parts, shape, seeds(name))
    return out | {k: v for k, v in received.items() if k in reference and not reference[k].is_floating_point()}, None
