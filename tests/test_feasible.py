"""Feasible-only sampling: every candidate a sampler proposes fits the budget, none that fits is out of reach."""

from __future__ import annotations

import json
import random

import optuna
import pytest
import search_standin
from optuna.trial import TrialState
from rich.console import Console

from psc_nas.nets import cost
from psc_nas.search.budget import Budget
from psc_nas.search.catalog import Catalog
from psc_nas.search.feasible import Feasibility, RestrictedSampler
from psc_nas.search.record import read_trials
from psc_nas.search.runner import SearchSettings, _catalog, make_sampler, run_search
from psc_nas.space import SearchSpace, replay_all

SPATIAL = search_standin.SPATIAL
SMALL_SPACE = {
    "name": "small",
    "task": "ibsr",
    "backbone": "densenet3d",
    "hparams": {
        "in_channels": 1,
        "num_classes": 4,
        "init_channels": 8,
        "growth_rate": 6,
        "side_channels": 4,
        "num_blocks": 3,
        "layers_per_block": 2,
    },
    "blocks": {
        "share": True,
        "ops": {
            "conv3d": {},
            "csn_ip": {},
            "p3d": {"orientation": ["1x3x3", "3x1x3"]},
            "pmscn": {"m": [1], "n": [1], "orientations": "all"},
        },
        "groups": [
            {"name": "block1", "slots": "block1.*"},
            {"name": "block2", "slots": "block2.*"},
            {"name": "rest", "slots": "*"},
        ],
    },
}


@pytest.fixture(scope="module")
def ibsr() -> Catalog:
    return _catalog("ibsr_densenet3d", SPATIAL)


def _study(tmp_path, name: str, sampler: str, seed: int) -> optuna.Study:
    inner = make_sampler(sampler, seed=seed, population=6)
    return optuna.create_study(
        storage=f"sqlite:///{tmp_path / f'{name}.db'}",
        study_name=name,
        sampler=RestrictedSampler(inner, seed=seed),
        directions=["maximize", "minimize"],
    )


def _random_budget(rng: random.Random, catalog: Catalog) -> Budget:
    low = min(c for c, _ in catalog.cheapest())  # csn_ip everywhere: the cheapest in both
    high = catalog.costliest_macs()
    params = rng.randint(low.params, high.params)
    macs = rng.randint(low.macs, high.macs)
    return [Budget(params=params), Budget(macs=macs), Budget(params=params, macs=macs)][rng.randrange(3)]


@pytest.mark.slow
def test_every_proposed_candidate_fits_random_budgets(tmp_path, ibsr):
    """Real SQLite studies, each sampler, budgets drawn between the space's minimum and maximum: all fit,
    priced with the exact cost, and the walk's additive prediction is that exact cost."""
    rng = random.Random(0)
    restricted = 0
    for round_ in range(6):
        budget = _random_budget(rng, ibsr)
        feasibility = Feasibility(ibsr, budget)
        for sampler in ("random", "tpe", "nsga2"):
            study = _study(tmp_path, f"r{round_}{sampler}", sampler, seed=round_)
            for _ in range(8):
                trial = study.ask()
                config = feasibility.sample(trial)
                price = cost(config, SPATIAL)
                assert budget.fits(price), f"{budget.describe()}: sampled {price} ({sampler})"
                assert study.sampler.fallbacks <= study.sampler.redrawn  # a fallback only after redraws
                study.tell(trial, [rng.random(), price.params])
            restricted += study.sampler.redrawn
        picks = feasibility.decide(lambda name, choices, admissible: rng.choice(admissible))[1]
        exact = cost(ibsr.compose([options[p] for options, p in zip(ibsr.options, picks)]), SPATIAL)
        assert tuple(feasibility.cost_of(picks)) == (exact.params, exact.macs)
    assert restricted > 0, "the budgets should have made the samplers propose inadmissible answers"


def test_unrestricted_sampling_misses_the_same_budget(tmp_path, ibsr):
    """The control: at 1M params the plain sampler's candidates mostly do not fit."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    prices = [cost(ibsr.space.sample(study.ask()), SPATIAL) for _ in range(20)]
    assert sum(Budget(params=1_000_000).fits(p) for p in prices) < 5


def test_restricted_sampling_reaches_exactly_the_feasible_configs(tmp_path):
    """On a space small enough to list: the configs restricted sampling can give are the feasible ones, all of them."""
    space = SearchSpace.from_dict(SMALL_SPACE)
    catalog = Catalog(space, SPATIAL)
    every = {c.hash: cost(c, SPATIAL) for c in replay_all(space.decide)}
    prices = sorted(every.values(), key=lambda c: c.params)
    for budget in (
        Budget(params=prices[len(prices) // 4].params),
        Budget(macs=sorted(c.macs for c in prices)[len(prices) // 3]),
        Budget(params=prices[len(prices) // 2].params, macs=sorted(c.macs for c in prices)[len(prices) // 5]),
    ):
        feasible = {h for h, c in every.items() if budget.fits(c)}
        assert 1 < len(feasible) < len(every)
        feasibility = Feasibility(catalog, budget)
        # every config restricted sampling can produce: each branch of admissible answers, replayed
        seen = {
            c.hash
            for c in replay_all(
                lambda ask, f=feasibility: f.decide(lambda name, choices, admissible: ask(name, admissible))[0]
            )
        }
        assert seen == feasible, budget.describe()


def test_an_answer_outside_the_admissible_ones_is_followed(ibsr):
    """A fixed parameter (an enqueued trial) may be over budget: the walk builds it, unrestricted after."""
    feasibility = Feasibility(ibsr, Budget(params=1_000_000))
    config, picks = feasibility.decide(lambda name, choices, admissible: choices[0])  # conv3d everywhere
    assert cost(config, SPATIAL).params > 1_000_000
    exact = cost(config, SPATIAL)
    assert tuple(feasibility.cost_of(picks)) == (exact.params, exact.macs)


def test_projection_shrinks_an_over_budget_candidate_until_it_fits(ibsr):
    rng = random.Random(2)
    for budget in (Budget(params=1_000_000), Budget(macs=2_000_000_000), Budget(params=2_000_000, macs=5_000_000_000)):
        feasibility = Feasibility(ibsr, budget)
        for _ in range(10):
            picks = feasibility.decide(lambda name, choices, admissible: rng.choice(choices))[1]
            built = feasibility.project(picks)
            assert feasibility.fits(feasibility.cost_of(built))
            if feasibility.fits(feasibility.cost_of(picks)):
                assert built == picks
            answers = feasibility.answers(built)
            config = ibsr.space.decide(lambda name, choices, given=answers: given.get(name, choices[0]))
            assert budget.fits(cost(config, SPATIAL))


@pytest.mark.parametrize("budget", [Budget(params=1_000_000), Budget(macs=2_000_000_000)], ids=["1M", "2G-MACs"])
def test_search_near_the_space_minimum_evaluates_every_trial(tmp_path, budget):
    """psc-search at 1M params or 2G MACs: 4 distinct architectures, none over budget, a hypervolume > 0."""
    settings = SearchSettings(
        task="ibsr", budget=budget, trials=4, out=tmp_path / "run", retrain=False, prescreen="none"
    )
    front = run_search(settings, evaluator=search_standin.StandinEvaluator(), console=Console(quiet=True))
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    records = read_trials(study)
    assert [r.state for r in records] == [TrialState.COMPLETE] * 4
    assert len({r.arch_hash for r in records}) == 4
    assert all(budget.fits(cost(r.config(), SPATIAL)) for r in records)
    assert records[0].preset == "csn_ip"
    assert front.hypervolume > 0
    assert json.loads((tmp_path / "run" / "pareto.json").read_text())["hypervolume"] == front.hypervolume


def test_a_macs_only_hypervolume_is_over_the_given_budget(tmp_path):
    """One trial at 2G MACs: (metric, MACs) over [0, 2G], not params over the largest seen (which is 0)."""
    settings = SearchSettings(
        task="ibsr", budget=Budget(macs=2_000_000_000), trials=1, out=tmp_path / "run", retrain=False
    )
    front = run_search(settings, evaluator=search_standin.StandinEvaluator(), console=Console(quiet=True))
    (member,) = front.members
    dice = member.values[0]
    assert front.hypervolume == pytest.approx(dice * (1 - member.macs / 2_000_000_000))


def test_the_last_decision_avoids_configs_already_in_the_study(ibsr):
    """Near the minimum few configs fit; a sampler that keeps choosing the first answer gets a new one."""
    budget = Budget(params=1_000_000)
    feasibility = Feasibility(ibsr, budget)

    def first(name, choices, admissible):
        return admissible[0]

    seen: set[str] = set()
    for _ in range(5):
        config = feasibility.decide(first, avoid=seen)[0]
        assert config.hash not in seen and budget.fits(cost(config, SPATIAL))
        seen.add(config.hash)
    assert feasibility.decide(first)[0].hash in seen  # without avoid: the first one again


def test_projected_trials_record_the_parameters_built(tmp_path, ibsr):
    """--budget-sampling project: the sampler asks freely, the candidate built fits, and a trial whose
    candidate was shrunk stores the parameters that build it beside what was asked."""
    from psc_nas.search.pricing import Pricing

    budget = Budget(params=1_000_000)
    pricing = Pricing(budget, ibsr, "project")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}", sampler=optuna.samplers.RandomSampler(seed=0))
    shrunk = 0
    for _ in range(5):
        trial = study.ask()
        config = pricing.sample(trial)
        assert budget.fits(cost(config, SPATIAL))
        built = study.trials[-1].user_attrs.get("built_params")
        if built is not None:
            shrunk += 1
            assert built != trial.params
            assert ibsr.space.decide(lambda name, choices, given=built: given.get(name, choices[0])).hash == config.hash
        study.tell(trial, 0.5)
    assert shrunk > 0
