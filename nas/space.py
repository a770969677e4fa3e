"""The search space: depth, hidden size, and per-layer heads and FFN size of a BERT.

An :class:`ArchConfig` is one frozen point of the space with a stable, readable
key (the cache key for accuracy and latency). A :class:`SearchSpace` derives its
choices from the teacher's config, samples, validates, and encodes an
architecture as a fixed-length vector of categorical choices, the form every
controller (Optuna samplers, REINFORCE, evolution) works on.

Depth is by layer choice: an L-layer sub-network keeps L of the teacher's layers, evenly
spaced (``spaced_layers``; DistilBERT, DynaBERT), recorded in ``ArchConfig.layer_ids``.

Validity rules, from how a sub-network is cut out of the teacher:
- heads keep the teacher's head dimension, so the hidden size is a multiple of
  it and a layer has at most ``hidden / head_dim`` heads (the extracted model is
  a Hugging Face BERT whose pruned heads are recorded in ``config.pruned_heads``);
- depth, hidden, heads and FFN sizes never exceed the teacher's (sub-networks
  are slices of its weights).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import BertConfig

from canao.errors import CanaoError


class InvalidArchitectureError(CanaoError):
    """An architecture that cannot be cut out of the teacher."""


@dataclass(frozen=True)
class ArchConfig:
    """One BERT architecture: hidden size plus heads and FFN size for each layer."""

    hidden_size: int
    heads: tuple[int, ...]  # attention heads per layer; len == number of layers
    ffn: tuple[int, ...]  # FFN (intermediate) size per layer
    head_dim: int = 64
    # Which of the teacher's layers the sub-network keeps, in order (DistilBERT, DynaBERT:
    # evenly spaced rather than the first L). None: the first L, which is also how a
    # model's own layers are described.
    layer_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists from JSON or Optuna and store tuples, so the object hashes.
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "ffn", tuple(int(f) for f in self.ffn))
        if self.layer_ids is not None:
            ids = tuple(int(i) for i in self.layer_ids)
            # The first L layers are spelt None, so equal architectures have one key.
            object.__setattr__(self, "layer_ids", None if ids == tuple(range(len(ids))) else ids)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """The teacher layer each of this architecture's layers is cut from."""
        return self.layer_ids if self.layer_ids is not None else tuple(range(self.num_layers))

    @property
    def shape_key(self) -> str:
        """Sizes only: ``L4-H256-d32-a8.8.6.4-f1024.768.768.512``. What latency depends on."""
        heads = ".".join(map(str, self.heads))
        ffn = ".".join(map(str, self.ffn))
        return f"L{self.num_layers}-H{self.hidden_size}-d{self.head_dim}-a{heads}-f{ffn}"

    @property
    def key(self) -> str:
        """Stable and readable: the shape key, plus ``-l0.2.4`` when layers are chosen."""
        if self.layer_ids is None:
            return self.shape_key
        return f"{self.shape_key}-l{'.'.join(map(str, self.layer_ids))}"

    def with_layers(self, layer_ids: tuple[int, ...] | None) -> ArchConfig:
        return ArchConfig(self.hidden_size, self.heads, self.ffn, self.head_dim, layer_ids)

    @classmethod
    def from_key(cls, key: str) -> ArchConfig:
        try:
            fields = dict((part[0], part[1:]) for part in key.split("-"))
            heads = tuple(int(h) for h in fields["a"].split("."))
            ffn = tuple(int(f) for f in fields["f"].split("."))
            ids = tuple(int(i) for i in fields["l"].split(".")) if "l" in fields else None
            arch = cls(int(fields["H"]), heads, ffn, int(fields["d"]), ids)
        except (KeyError, ValueError, IndexError):
            raise InvalidArchitectureError(f"not an architecture key: {key!r}") from None
        if arch.num_layers != int(fields["L"]):
            raise InvalidArchitectureError(f"{key!r}: L does not match the per-layer lists")
        return arch

    def validate(self) -> ArchConfig:
        """Self-consistency (independent of any teacher); returns self for chaining."""
        problems: list[str] = []
        if not self.heads:
            problems.append("at least one layer is needed")
        if len(self.ffn) != len(self.heads):
            problems.append(f"{len(self.heads)} head counts but {len(self.ffn)} FFN sizes")
        if self.head_dim <= 0 or self.hidden_size <= 0 or self.hidden_size % self.head_dim:
            problems.append(
                f"hidden {self.hidden_size} is not a multiple of head dim {self.head_dim}"
            )
        ids = self.kept_layers
        if len(ids) != len(self.heads):
            problems.append(f"{len(ids)} layer ids for {len(self.heads)} layers")
        if any(b <= a for a, b in itertools.pairwise(ids)) or min(ids, default=0) < 0:
            problems.append(f"layer ids {list(ids)} must be increasing and non-negative")
        max_heads = self.hidden_size // max(self.head_dim, 1)
        for layer, (heads, ffn) in enumerate(zip(self.heads, self.ffn, strict=False)):
            if not 1 <= heads <= max_heads:
                problems.append(
                    f"layer {layer}: {heads} heads (1..{max_heads} for this hidden size)"
                )
            if ffn < 1:
                problems.append(f"layer {layer}: FFN size {ffn}")
        if problems:
            raise InvalidArchitectureError(
                f"impossible architecture {self.key}: " + "; ".join(problems)
            )
        return self

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "heads": list(self.heads),
            "ffn": list(self.ffn),
            "head_dim": self.head_dim,
            "layer_ids": list(self.kept_layers),
        }

    def encoder_params(self) -> int:
        """Weights in the transformer layers (embeddings excluded): the size that search changes."""
        h = self.hidden_size
        total = 0
        for heads, ffn in zip(self.heads, self.ffn, strict=True):
            inner = heads * self.head_dim
            total += 3 * (h * inner + inner) + inner * h + h  # Q, K, V, attention output
            total += h * ffn + ffn + ffn * h + h + 4 * h  # FFN and two layer norms
        return total


DEPTH_RULES = ("spaced", "first")


def spaced_layers(layers: int, teacher_layers: int) -> tuple[int, ...]:
    """``layers`` of ``teacher_layers`` evenly spaced from the first: 3 of 6 -> (0, 2, 4).

    DistilBERT initialises its 6 layers from every other one of BERT-base's 12, and DynaBERT
    drops every k-th layer: both keep the first layer and spread the rest evenly.
    """
    if not 1 <= layers <= teacher_layers:
        raise InvalidArchitectureError(f"{layers} layers of a {teacher_layers}-layer teacher")
    return tuple((i * teacher_layers) // layers for i in range(layers))


def _fractions(full: int, fractions: Sequence[float], multiple: int) -> tuple[int, ...]:
    values = {max(multiple, round(full * f / multiple) * multiple) for f in fractions}
    return tuple(sorted(v for v in values if v <= full))


@dataclass(frozen=True)
class SearchSpace:
    """Choices for each dimension, derived from a teacher; all sub-networks are its slices."""

    layer_choices: tuple[int, ...]
    hidden_choices: tuple[int, ...]
    head_choices: tuple[int, ...]
    ffn_choices: tuple[int, ...]
    head_dim: int
    # How an L-layer sub-network picks its layers: "spaced" (evenly over the teacher's depth,
    # as DistilBERT and DynaBERT do) or "first" (the first L).
    depth_rule: str = "spaced"

    def __post_init__(self) -> None:
        if self.depth_rule not in DEPTH_RULES:
            raise InvalidArchitectureError(
                f"unknown depth rule {self.depth_rule!r}; choose from {', '.join(DEPTH_RULES)}"
            )

    def layer_ids(self, layers: int) -> tuple[int, ...] | None:
        """The teacher layers an ``layers``-deep sub-network keeps under this space's rule."""
        if self.depth_rule == "first" or layers >= self.max_layers:
            return None
        return spaced_layers(layers, self.max_layers)

    @classmethod
    def from_teacher(
        cls,
        config: BertConfig,
        *,
        min_layers: int = 1,
        width_fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        hidden_fractions: Sequence[float] = (0.5, 0.625, 0.75, 0.875, 1.0),
    ) -> SearchSpace:
        """Depth 1..L, hidden/heads/FFN as fractions of the teacher's (rounded to legal values)."""
        head_dim = config.hidden_size // config.num_attention_heads
        return cls(
            layer_choices=tuple(range(max(1, min_layers), config.num_hidden_layers + 1)),
            hidden_choices=_fractions(config.hidden_size, hidden_fractions, head_dim),
            head_choices=_fractions(config.num_attention_heads, width_fractions, 1),
            ffn_choices=_fractions(config.intermediate_size, width_fractions, 64),
            head_dim=head_dim,
        )

    @property
    def max_layers(self) -> int:
        return max(self.layer_choices)

    def largest(self) -> ArchConfig:
        hidden = max(self.hidden_choices)
        heads = self._fit_heads(max(self.head_choices), hidden)
        return ArchConfig(
            hidden,
            (heads,) * self.max_layers,
            (max(self.ffn_choices),) * self.max_layers,
            self.head_dim,
        )

    def smallest(self, full_depth: bool = False) -> ArchConfig:
        """The narrowest point (at full depth with ``full_depth``: width-only shrinking)."""
        layers = self.max_layers if full_depth else min(self.layer_choices)
        return ArchConfig(
            min(self.hidden_choices),
            (min(self.head_choices),) * layers,
            (min(self.ffn_choices),) * layers,
            self.head_dim,
            self.layer_ids(layers),
        )

    def sample(self, rng: random.Random, full_depth: bool = False) -> ArchConfig:
        """Uniform over each choice (heads over the ones legal for the sampled hidden size).

        ``full_depth`` samples widths only, as progressive shrinking's first phase does.
        """
        layers = self.max_layers if full_depth else rng.choice(self.layer_choices)
        hidden = rng.choice(self.hidden_choices)
        legal = [h for h in self.head_choices if h * self.head_dim <= hidden]
        heads = tuple(rng.choice(legal) for _ in range(layers))
        ffn = tuple(rng.choice(self.ffn_choices) for _ in range(layers))
        return ArchConfig(hidden, heads, ffn, self.head_dim, self.layer_ids(layers))

    def contains(self, arch: ArchConfig) -> None:
        """Raise :class:`InvalidArchitectureError` unless ``arch`` is a point of this space."""
        arch.validate()
        problems = []
        if arch.head_dim != self.head_dim:
            problems.append(f"head dim {arch.head_dim} != teacher's {self.head_dim}")
        if arch.num_layers not in self.layer_choices:
            problems.append(f"{arch.num_layers} layers not in {self.layer_choices}")
        elif arch.kept_layers[-1] >= self.max_layers:
            problems.append(f"layer ids {list(arch.kept_layers)} beyond {self.max_layers} layers")
        if arch.hidden_size not in self.hidden_choices:
            problems.append(f"hidden {arch.hidden_size} not in {self.hidden_choices}")
        problems += [
            f"{h} heads not in {self.head_choices}"
            for h in set(arch.heads) - set(self.head_choices)
        ]
        problems += [
            f"FFN {f} not in {self.ffn_choices}" for f in set(arch.ffn) - set(self.ffn_choices)
        ]
        if problems:
            raise InvalidArchitectureError(
                f"{arch.key} is outside the search space: " + "; ".join(problems)
            )

    # ---- the fixed-length categorical encoding controllers work on ----

    def dimensions(self) -> dict[str, tuple[int, ...]]:
        """Name -> choices, fixed length: per-layer entries exist for every possible layer.

        Entries for layers beyond the sampled depth are inactive (ignored by
        :meth:`decode`); keeping them makes the space non-conditional, which
        NSGA-II, TPE and REINFORCE all handle without special cases.
        """
        dims: dict[str, tuple[int, ...]] = {
            "layers": self.layer_choices,
            "hidden": self.hidden_choices,
        }
        for layer in range(self.max_layers):
            dims[f"heads_{layer}"] = self.head_choices
            dims[f"ffn_{layer}"] = self.ffn_choices
        return dims

    def decode(self, params: Mapping[str, int]) -> ArchConfig:
        """Values per dimension -> architecture; heads above the hidden size's limit are clipped.

        Clipping (rather than rejecting) keeps every encoded point valid, so a
        controller never wastes a trial on an impossible architecture.
        """
        missing = [name for name in self.dimensions() if name not in params]
        if missing:
            raise InvalidArchitectureError(f"missing choices {missing}")
        layers, hidden = int(params["layers"]), int(params["hidden"])
        legal = [h for h in self.head_choices if h * self.head_dim <= hidden]
        heads = tuple(self._clip(int(params[f"heads_{i}"]), legal) for i in range(layers))
        ffn = tuple(int(params[f"ffn_{i}"]) for i in range(layers))
        arch = ArchConfig(hidden, heads, ffn, self.head_dim, self.layer_ids(layers))
        self.contains(arch)
        return arch

    def encode(self, arch: ArchConfig) -> dict[str, int]:
        """Architecture -> values per dimension (inactive layers repeat the last active one)."""
        self.contains(arch)
        params = {"layers": arch.num_layers, "hidden": arch.hidden_size}
        for layer in range(self.max_layers):
            source = min(layer, arch.num_layers - 1)
            params[f"heads_{layer}"] = arch.heads[source]
            params[f"ffn_{layer}"] = arch.ffn[source]
        return params

    def _fit_heads(self, heads: int, hidden: int) -> int:
        return self._clip(heads, [h for h in self.head_choices if h * self.head_dim <= hidden])

    @staticmethod
    def _clip(value: int, legal: Sequence[int]) -> int:
        if not legal:
            raise InvalidArchitectureError("no head count fits this hidden size")
        fitting = [h for h in legal if h <= value]
        return max(fitting) if fitting else min(legal)

    def uniform(self, layers: int, fraction: float) -> ArchConfig:
        """A uniformly shrunk architecture (the baseline the search is compared with)."""

        def pick(choices: tuple[int, ...]) -> int:
            target = max(choices) * fraction
            return min(choices, key=lambda c: (abs(c - target), c))

        hidden = pick(self.hidden_choices)
        heads = self._fit_heads(pick(self.head_choices), hidden)
        ffn = pick(self.ffn_choices)
        ids = self.layer_ids(layers)
        return ArchConfig(hidden, (heads,) * layers, (ffn,) * layers, self.head_dim, ids)


def contains(outer: ArchConfig, inner: ArchConfig) -> bool:
    """``inner`` is a sub-network of ``outer`` in every size latency follows.

    Hidden size no larger, and each of inner's layers matched to a distinct layer of outer
    with no more heads and no larger FFN (a bipartite matching: latency ignores layer order).
    """
    if inner.head_dim != outer.head_dim or inner.hidden_size > outer.hidden_size:
        return False
    if inner.num_layers > outer.num_layers:
        return False
    import networkx as nx

    graph = nx.Graph()
    left = [("inner", i) for i in range(inner.num_layers)]
    graph.add_nodes_from(left)
    graph.add_nodes_from(("outer", j) for j in range(outer.num_layers))
    for i in range(inner.num_layers):
        for j in range(outer.num_layers):
            if inner.heads[i] <= outer.heads[j] and inner.ffn[i] <= outer.ffn[j]:
                graph.add_edge(("inner", i), ("outer", j))
    matching = nx.bipartite.maximum_matching(graph, top_nodes=left)
    return all(node in matching for node in left)
