"""Search controllers, each an Optuna sampler: the study's trial history is the controller state.

A search worker asks the study for a trial, suggests every dimension of
:meth:`SearchSpace.dimensions` as a categorical, evaluates the decoded
architecture and tells the study the result (or ``state=FAIL``)::

    trial = study.ask()
    params = {name: trial.suggest_categorical(name, list(choices))
              for name, choices in space.dimensions().items()}
    study.tell(trial, evaluate(space.decode(params)))

Why the history is the state: a NAS run evaluates expensive architectures for
hours, gets killed, is resumed, and is spread over several worker processes that
share one storage (SQLite or any database URL). If a controller kept its
population, policy or random stream in memory, each of those would need a
checkpoint format and a merge rule. Instead every controller here recomputes
what it needs from the COMPLETE trials in the study (evolution: the population;
REINFORCE: the policy, by replaying the rewards in trial-number order; NSGA-II
keeps its generations in the study's system attributes), and draws its random
numbers from ``(seed, trial.number)``. So a resumed run continues where it
stopped, a second worker joins without coordination, and two workers never
share a random stream (a fresh sampler with the same seed would otherwise
repeat the first proposals after a restart).

Controllers: ``evolution`` (regularised evolution, Real et al. 2019, as in HAT),
``rl`` (REINFORCE with a moving-average baseline, as in MnasNet/CANAO), ``tpe``,
``nsga2`` and ``random``. Only ``nsga2``, ``tpe`` and ``random`` handle a
multi-objective study (accuracy and latency as a Pareto search); ``rl`` and
``evolution`` need a scalar reward.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from canao.errors import CanaoError
from canao.nas.space import SearchSpace

CONTROLLERS = ("evolution", "rl", "tpe", "nsga2", "random")
PARETO_CONTROLLERS = ("nsga2", "tpe", "random")
SCALAR_CONTROLLERS = ("evolution", "rl")


class UnknownControllerError(CanaoError):
    """A controller that does not exist, or that cannot run the search asked of it.

    The second case is a scalar-reward controller (``rl``, ``evolution``) asked
    for a multi-objective (Pareto) search.
    """


def check_controller(name: str, multi_objective: bool = False) -> None:
    """Raise :class:`UnknownControllerError` for a name or objective the controller cannot do."""
    if name not in CONTROLLERS:
        raise UnknownControllerError(
            f"unknown controller {name!r}; choose one of: {', '.join(CONTROLLERS)}"
        )
    if multi_objective and name in SCALAR_CONTROLLERS:
        raise UnknownControllerError(_scalar_only_message(name))


def make_sampler(
    name: str,
    space: SearchSpace,
    *,
    seed: int | None = None,
    multi_objective: bool = False,
    **options: Any,
) -> BaseSampler:
    """The Optuna sampler for controller ``name``; ``options`` go to its constructor.

    Defaults: ``tpe`` is multivariate (the dimensions interact: heads are
    clipped by the hidden size) with ``constant_liar`` (parallel workers see
    each other's running trials and do not propose the same point) and 10
    random start-up trials; ``nsga2`` and ``evolution`` use populations of 20.
    """
    check_controller(name, multi_objective)
    if name == "evolution":
        return RegularizedEvolutionSampler(space, seed=seed, **options)
    if name == "rl":
        return ReinforceSampler(space, seed=seed, **options)
    if name == "tpe":
        tpe_options = {
            "multivariate": True,
            "constant_liar": True,
            "n_startup_trials": 10,
            **options,
        }
        return TrialSeededSampler(lambda s: TPESampler(seed=s, **tpe_options), seed)
    if name == "nsga2":
        nsga_options = {"population_size": 20, **options}
        return TrialSeededSampler(lambda s: NSGAIISampler(seed=s, **nsga_options), seed)
    return TrialSeededSampler(lambda s: RandomSampler(seed=s, **options), seed)


def _scalar_only_message(name: str) -> str:
    return (
        f"controller {name!r} needs a scalar reward and cannot run a multi-objective "
        f"study; for a Pareto search use one of: {', '.join(PARETO_CONTROLLERS)}"
    )


def trial_seed(seed: int | None, number: int) -> int | None:
    """A seed for one trial, derived from the run's seed and the trial number.

    Seeding per trial (instead of one stream per sampler object) makes a
    proposal depend only on the seed, the trial number and the history, so a
    restarted or second worker does not replay the first worker's draws.
    ``None`` stays ``None`` (fresh OS entropy).
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}/{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class TrialSeededSampler(BaseSampler):
    """Runs each trial with a fresh Optuna sampler seeded from ``(seed, trial.number)``.

    Optuna's built-in samplers draw from one random stream per sampler object:
    a resumed run with the same seed would repeat its first draws, and workers
    given the same seed would propose identical start-up points. TPE, NSGA-II
    and random sampling keep no other state outside the study, so a fresh
    instance per trial loses nothing.
    """

    _MAX_OPEN = 1024  # per-trial samplers kept for trials not yet told (bounded)

    def __init__(self, factory: Callable[[int | None], BaseSampler], seed: int | None) -> None:
        self._factory = factory
        self._seed = seed
        self._open: dict[tuple[str, int], BaseSampler] = {}
        self._lock = threading.Lock()

    def _for(self, study: Study, trial: FrozenTrial) -> BaseSampler:
        key = (study.study_name, trial.number)
        with self._lock:
            sampler = self._open.get(key)
            if sampler is None:
                if len(self._open) >= self._MAX_OPEN:  # trials abandoned without tell
                    self._open.pop(next(iter(self._open)))
                sampler = self._factory(trial_seed(self._seed, trial.number))
                self._open[key] = sampler
            return sampler

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        sampler = self._for(study, trial)
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._for(study, trial).after_trial(study, trial, state, values)
        with self._lock:
            self._open.pop((study.study_name, trial.number), None)

    def reseed_rng(self) -> None:
        """Nothing to do: per-trial seeds already differ between trials and workers."""


class _SpaceSampler(BaseSampler):
    """Shared plumbing of the two NAS-specific samplers: the space, seeding, fallbacks."""

    _controller_name = ""  # the name make_sampler knows it by, for error messages

    def __init__(self, space: SearchSpace, *, seed: int | None) -> None:
        self._space = space
        self._seed = seed
        self._dims = space.dimensions()
        self._distributions = {
            name: CategoricalDistribution(list(choices)) for name, choices in self._dims.items()
        }
        self._fallback = TrialSeededSampler(lambda s: RandomSampler(seed=s), seed)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        """Refuse a multi-objective study at ``study.ask()``, before any work is done."""
        if len(study.directions) > 1:
            raise UnknownControllerError(_scalar_only_message(self._controller_name))
        self._fallback.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """The whole space, every trial: the proposal is one joint draw, not per-parameter."""
        return dict(self._distributions)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Parameters outside the space (or with other choices) are sampled at random."""
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._fallback.after_trial(study, trial, state, values)

    def _rng(self, trial: FrozenTrial) -> random.Random:
        return random.Random(trial_seed(self._seed, trial.number))

    def _history(self, study: Study) -> list[FrozenTrial]:
        """COMPLETE trials with a value and a choice for every dimension, by trial number.

        FAIL, PRUNED and RUNNING trials carry no reward and are ignored; so are
        trials recorded with another space's choices (e.g. a study reused after
        the teacher changed).
        """
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        usable = [t for t in trials if t.values and self._in_space(t.params)]
        return sorted(usable, key=lambda t: t.number)

    def _in_space(self, params: Mapping[str, Any]) -> bool:
        return all(params.get(name) in choices for name, choices in self._dims.items())

    def _random_params(self, rng: random.Random) -> dict[str, Any]:
        return {name: rng.choice(choices) for name, choices in self._dims.items()}


class RegularizedEvolutionSampler(_SpaceSampler):
    """Regularised (aging) evolution, Real et al. 2019, as used by HAT.

    The population is the last ``population_size`` COMPLETE trials by trial
    number, so the oldest member dies as each new one is added (aging), and the
    population is a pure function of the history. Until the history holds a
    full population the proposals are uniformly random. After that a proposal
    is a mutation of the best of ``tournament_size`` members drawn from the
    population: each dimension is redrawn, to a different value, with
    probability ``mutation_prob`` (default ``2 / number of dimensions``); at
    least one dimension always changes, and a few attempts are made to change
    the *decoded* architecture (per-layer entries beyond the depth are
    inactive, and a child equal to its parent would waste an evaluation).
    """

    _controller_name = "evolution"
    _DECODE_ATTEMPTS = 10

    def __init__(
        self,
        space: SearchSpace,
        *,
        seed: int | None = None,
        population_size: int = 20,
        tournament_size: int = 5,
        mutation_prob: float | None = None,
    ) -> None:
        super().__init__(space, seed=seed)
        if population_size < 1 or not 1 <= tournament_size <= population_size:
            raise ValueError(
                f"need 1 <= tournament_size ({tournament_size}) <= "
                f"population_size ({population_size})"
            )
        self.population_size = population_size
        self.tournament_size = tournament_size
        self.mutation_prob = (
            min(1.0, 2 / len(self._dims)) if mutation_prob is None else mutation_prob
        )

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        rng = self._rng(trial)
        population = self._history(study)[-self.population_size :]
        if len(population) < self.population_size:
            return self._random_params(rng)
        parent = self._tournament(population, study.direction, rng)
        return self._child(parent.params, rng)

    def _tournament(
        self, population: list[FrozenTrial], direction: StudyDirection, rng: random.Random
    ) -> FrozenTrial:
        contestants = rng.sample(population, self.tournament_size)
        if direction == StudyDirection.MINIMIZE:
            return min(contestants, key=lambda t: t.values[0])
        return max(contestants, key=lambda t: t.values[0])

    def _child(self, parent: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
        parent_arch = self._space.decode(parent)
        child = self._mutate(parent, rng)
        for _ in range(self._DECODE_ATTEMPTS - 1):
            if self._space.decode(child) != parent_arch:
                break
            child = self._mutate(parent, rng)
        return child

    def _mutate(self, parent: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
        child = {name: parent[name] for name in self._dims}
        mutable = [name for name, choices in self._dims.items() if len(choices) > 1]
        if not mutable:
            return child
        chosen = [name for name in mutable if rng.random() < self.mutation_prob]
        for name in chosen or [rng.choice(mutable)]:
            child[name] = rng.choice([c for c in self._dims[name] if c != parent[name]])
        return child


class ReinforceSampler(_SpaceSampler):
    """REINFORCE over one softmax per dimension, as in MnasNet and CANAO.

    The policy is never stored: it is a deterministic replay of the COMPLETE
    trials in trial-number order. For each trial the advantage is its reward
    minus a baseline (exponential moving average of rewards with ``decay``,
    started at the first reward), divided by a running RMS of the advantages
    (so ``lr`` means the same whatever the reward's scale), and every
    dimension's logits move by ``lr * advantage * (onehot(choice) - softmax)``.
    A proposal then draws each dimension from its softmax. For a minimised
    objective the reward is the negated value.

    Replay is vectorised over dimensions (one padded logits matrix), costs
    microseconds per trial, and is cached: when the new history extends the
    cached one (the usual case) only the new trials are replayed.
    """

    _controller_name = "rl"

    def __init__(
        self,
        space: SearchSpace,
        *,
        seed: int | None = None,
        lr: float = 0.5,
        decay: float = 0.9,
        max_advantage: float = 3.0,
    ) -> None:
        super().__init__(space, seed=seed)
        self.lr = lr
        self.decay = decay
        self.max_advantage = max_advantage
        self._names = list(self._dims)
        self._index = [
            {choice: i for i, choice in enumerate(choices)} for choices in self._dims.values()
        ]
        self._cache: dict[str, ReinforcePolicy] = {}
        self._lock = threading.Lock()

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        probs = _softmax(self.policy(study).logits)
        rng = self._rng(trial)
        params = {}
        for d, (name, choices) in enumerate(self._dims.items()):
            weights = probs[d, : len(choices)].tolist()
            params[name] = rng.choices(choices, weights=weights)[0]
        return params

    def policy(self, study: Study) -> ReinforcePolicy:
        """The policy after replaying the study's history (cached per study)."""
        history = self._history(study)
        sign = -1.0 if study.direction == StudyDirection.MINIMIZE else 1.0
        with self._lock:
            state = self._cache.get(study.study_name)
            numbers = [t.number for t in history]
            if (
                state is None
                or state.sign != sign
                or numbers[: len(state.numbers)] != state.numbers
            ):
                state = ReinforcePolicy.initial(self._dims.values(), sign)
            new = history[len(state.numbers) :]
            if new:
                state = self._replay(state, new)
                self._cache[study.study_name] = state
            return state

    def _replay(self, state: ReinforcePolicy, trials: list[FrozenTrial]) -> ReinforcePolicy:
        state = state.copy()
        rows = np.arange(len(self._names))
        for t in trials:
            reward = state.sign * float(t.values[0])
            advantage = state.advantage(reward, self.decay, self.max_advantage)
            if advantage:
                grad = -_softmax(state.logits)
                grad[rows, self._choice_indices(t.params)] += 1.0
                state.logits += self.lr * advantage * grad
            state.numbers.append(t.number)
        return state

    def _choice_indices(self, params: Mapping[str, Any]) -> list[int]:
        return [index[params[name]] for name, index in zip(self._names, self._index, strict=True)]


@dataclass
class ReinforcePolicy:
    """Logits (dimensions x padded choices), baseline and advantage scale after some trials."""

    logits: np.ndarray
    sign: float  # +1 to maximise the objective, -1 to minimise it
    numbers: list[int] = field(default_factory=list)  # trials replayed, in order
    baseline: float | None = None
    mean_square: float | None = None  # running mean of squared raw advantages

    @classmethod
    def initial(cls, choices: Iterable[Sequence[Any]], sign: float) -> ReinforcePolicy:
        sizes = [len(c) for c in choices]
        logits = np.full((len(sizes), max(sizes)), -np.inf)
        for d, size in enumerate(sizes):
            logits[d, :size] = 0.0  # uniform; padding stays at -inf (probability 0)
        return cls(logits, sign)

    def copy(self) -> ReinforcePolicy:
        return replace(self, logits=self.logits.copy(), numbers=list(self.numbers))

    def advantage(self, reward: float, decay: float, limit: float) -> float:
        """Normalised, clipped advantage of ``reward``; updates the baseline and the scale."""
        if self.baseline is None:
            self.baseline = reward
        raw = reward - self.baseline
        self.baseline = decay * self.baseline + (1 - decay) * reward
        if raw == 0.0:
            return 0.0
        square = raw * raw
        self.mean_square = (
            square if self.mean_square is None else decay * self.mean_square + (1 - decay) * square
        )
        return max(-limit, min(limit, raw / math.sqrt(self.mean_square)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
