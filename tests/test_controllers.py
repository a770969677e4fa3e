"""One contract for every search controller, on a cheap synthetic objective.

The objective prefers one hidden architecture: the reward falls linearly with
the normalised distance of each dimension's choice index from a hidden optimum
(range about 0.5 to 1.0, like an accuracy), plus small noise fixed by the trial
number so that runs stay reproducible.
"""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from transformers import BertConfig

from canao.nas.controllers import (
    CONTROLLERS,
    ReinforceSampler,
    UnknownControllerError,
    make_sampler,
)
from canao.nas.space import SearchSpace

LEARNERS = ("evolution", "rl", "tpe", "nsga2")
PARETO = ("nsga2", "tpe", "random")


@pytest.fixture(autouse=True)
def _quiet_optuna() -> Iterator[None]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    teacher = BertConfig(
        hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6
    )
    return SearchSpace.from_teacher(teacher)


def make_objective(space: SearchSpace, seed: int = 0) -> Callable[[dict[str, Any], int], float]:
    dims = space.dimensions()
    rng = random.Random(seed)
    optimum = {name: rng.randrange(len(choices)) for name, choices in dims.items()}

    def objective(params: dict[str, Any], number: int) -> float:
        distance = sum(
            abs(choices.index(params[name]) - optimum[name]) / (len(choices) - 1)
            for name, choices in dims.items()
        ) / len(dims)
        noise = random.Random(seed * 100_003 + number).gauss(0.0, 0.01)
        return 1.0 - 0.5 * distance + noise

    return objective


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    return {
        name: trial.suggest_categorical(name, list(choices))
        for name, choices in space.dimensions().items()
    }


def run(
    study: optuna.Study,
    space: SearchSpace,
    n_trials: int,
    *,
    objective_seed: int = 0,
    fail_every: int | None = None,
) -> list[dict[str, Any]]:
    """The search worker's loop; returns the proposals in order."""
    objective = make_objective(space, objective_seed)
    proposals = []
    for _ in range(n_trials):
        trial = study.ask()
        params = suggest(trial, space)
        proposals.append(params)
        if fail_every and trial.number % fail_every == fail_every - 1:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, objective(params, trial.number))
    return proposals


def new_study(name: str, space: SearchSpace, seed: int | None = 0, **kwargs: Any) -> optuna.Study:
    sampler = make_sampler(name, space, seed=seed)
    return optuna.create_study(direction="maximize", sampler=sampler, **kwargs)


def values(study: optuna.Study) -> list[float]:
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    return [t.value for t in sorted(complete, key=lambda t: t.number)]


# ---- the contract, for every controller ----


@pytest.mark.parametrize("name", CONTROLLERS)
def test_proposals_are_valid_architectures(name: str, space: SearchSpace) -> None:
    study = new_study(name, space)
    proposals = run(study, space, 30)  # past the evolution's and NSGA-II's first population
    for params in proposals:
        assert set(params) == set(space.dimensions())
        space.contains(space.decode(params))


@pytest.mark.parametrize("name", CONTROLLERS)
def test_same_seed_same_proposals(name: str, space: SearchSpace) -> None:
    first = run(new_study(name, space, seed=7), space, 30)
    again = run(new_study(name, space, seed=7), space, 30)
    other = run(new_study(name, space, seed=8), space, 30)
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", CONTROLLERS)
def test_failed_trials_are_ignored(name: str, space: SearchSpace) -> None:
    study = new_study(name, space)
    proposals = run(study, space, 30, fail_every=5)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 6
    assert states.count(TrialState.COMPLETE) == 24
    for params in proposals:
        space.decode(params)


@pytest.mark.parametrize("name", CONTROLLERS)
def test_resume_from_sqlite_continues_the_same_search(
    name: str, space: SearchSpace, tmp_path: Path
) -> None:
    """A killed and resumed run makes exactly the proposals an uninterrupted run makes."""
    storage = f"sqlite:///{tmp_path / 'search.db'}"

    def open_study() -> optuna.Study:
        return optuna.create_study(
            storage=storage,
            study_name="nas",
            direction="maximize",
            sampler=make_sampler(name, space, seed=3),
            load_if_exists=True,
        )

    study = open_study()
    before = run(study, space, 15)
    del study  # the worker dies; only the storage survives
    after = run(open_study(), space, 15)

    trials = open_study().trials
    assert [t.number for t in trials] == list(range(30))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert after != before  # a fresh sampler does not replay the first draws
    assert before + after == run(new_study(name, space, seed=3), space, 30)


@pytest.mark.parametrize("name", CONTROLLERS)
def test_two_workers_on_one_storage_do_not_collide(name: str, space: SearchSpace) -> None:
    """Two samplers sharing a storage, each with a trial running, propose different points.

    (The resume test covers SQLite; one shared in-memory storage keeps this one fast.)
    """
    storage = optuna.storages.InMemoryStorage()
    workers = [
        optuna.create_study(
            storage=storage,
            study_name="nas",
            direction="maximize",
            sampler=make_sampler(name, space, seed=0),  # same seed: the usual mistake
            load_if_exists=True,
        )
        for _ in range(2)
    ]
    run(workers[0], space, 20)
    objective = make_objective(space)
    for _ in range(5):  # both workers hold a running trial at once
        trials = [worker.ask() for worker in workers]
        proposals = [suggest(trial, space) for trial in trials]
        assert proposals[0] != proposals[1]
        for worker, trial, params in zip(workers, trials, proposals, strict=True):
            worker.tell(trial, objective(params, trial.number))
    assert len(workers[1].trials) == 30


@pytest.mark.parametrize("name", LEARNERS)
def test_learns_better_than_random_search(name: str, space: SearchSpace) -> None:
    """Over 60 trials, the last 20 proposals score clearly above random search's last 20.

    Random search's last 20 estimate what an unguided search gets; a margin of
    0.02 is about two standard errors of that mean (rewards of random proposals
    have a standard deviation of about 0.045). Over objective/seed pairs
    0..19 the smallest margins seen were 0.045 (evolution), 0.081 (rl), 0.054
    (tpe) and 0.024 (nsga2, whose default population of 20 leaves it only
    three generations).
    """
    budget, window, margin = 60, 20, 0.02
    for seed in (0, 1):
        study = new_study(name, space, seed=seed)
        run(study, space, budget, objective_seed=seed)
        baseline = new_study("random", space, seed=seed)
        run(baseline, space, budget, objective_seed=seed)
        learned = statistics.mean(values(study)[-window:])
        unguided = statistics.mean(values(baseline)[-window:])
        assert learned > unguided + margin, (seed, learned, unguided)


# ---- multi-objective (accuracy up, latency down) ----


def latency_proxy(space: SearchSpace, params: dict[str, Any]) -> float:
    return space.decode(params).encoder_params() / space.largest().encoder_params()


@pytest.mark.parametrize("name", PARETO)
def test_pareto_search(name: str, space: SearchSpace) -> None:
    sampler = make_sampler(name, space, seed=0, multi_objective=True)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    objective = make_objective(space)
    for _ in range(30):
        trial = study.ask()
        params = suggest(trial, space)
        study.tell(trial, [objective(params, trial.number), latency_proxy(space, params)])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 30
    assert study.best_trials


@pytest.mark.parametrize("name", ["rl", "evolution"])
def test_scalar_controllers_refuse_pareto_search(name: str, space: SearchSpace) -> None:
    with pytest.raises(UnknownControllerError, match="scalar reward") as error:
        make_sampler(name, space, multi_objective=True)
    for pareto in PARETO:
        assert pareto in str(error.value)

    # Also when the sampler is handed a multi-objective study directly.
    sampler = make_sampler(name, space, seed=0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    with pytest.raises(UnknownControllerError, match="scalar reward"):
        study.ask()


def test_unknown_controller(space: SearchSpace) -> None:
    with pytest.raises(UnknownControllerError, match="unknown controller 'bayes'") as error:
        make_sampler("bayes", space)
    for name in CONTROLLERS:
        assert name in str(error.value)


# ---- controller-specific ----


def test_evolution_minimises_when_asked(space: SearchSpace) -> None:
    objective = make_objective(space)
    study = optuna.create_study(
        direction="minimize", sampler=make_sampler("evolution", space, seed=0)
    )
    for _ in range(60):
        trial = study.ask()
        params = suggest(trial, space)
        study.tell(trial, -objective(params, trial.number))
    losses = values(study)
    assert statistics.mean(losses[-20:]) < statistics.mean(losses[:20]) - 0.02


def test_rl_replay_is_cheap_and_cached() -> None:
    """1000 trials of a 20-dimension space replay in well under a second, once."""
    teacher = BertConfig(
        hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=9
    )
    space = SearchSpace.from_teacher(teacher)
    dims = space.dimensions()
    assert len(dims) == 20
    distributions = {name: CategoricalDistribution(list(c)) for name, c in dims.items()}
    rng = random.Random(0)
    sampler = make_sampler("rl", space, seed=0)
    assert isinstance(sampler, ReinforceSampler)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.add_trials(
        optuna.trial.create_trial(
            params={name: rng.choice(c) for name, c in dims.items()},
            distributions=distributions,
            value=rng.random(),
        )
        for _ in range(1000)
    )
    start = time.perf_counter()
    policy = sampler.policy(study)
    assert time.perf_counter() - start < 0.5
    assert len(policy.numbers) == 1000
    assert sampler.policy(study) is policy  # nothing new: no replay
    space.decode(suggest(study.ask(), space))
