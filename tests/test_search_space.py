"""Search spaces: parsing ranges and lists, grids, log-uniform draws, optimizer-specific hyperparameters."""

import math

import pytest

from convdescent.search.space import Dimension, SearchSpace, SearchSpaceError, parse_dimension, point_key


def test_ranges_lists_and_single_values():
    lr = parse_dimension("lr", "1e-4:1e-1")
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-4, 1e-1, True, False)
    mom = parse_dimension("momentum", "0.5:0.99")
    assert not mom.log
    wd = parse_dimension("weight_decay", "1e-6:1e-2:lin")
    assert not wd.log
    bs = parse_dimension("batch_size", "16:256")
    assert bs.integer and bs.log and (bs.low, bs.high) == (16, 256)
    opt = parse_dimension("optimizer", "sgd,adam")
    assert opt.choices == ("sgd", "adam")
    assert parse_dimension("batch_size", "32,64").choices == (32, 64)
    assert parse_dimension("nesterov", "true,false").choices == (True, False)
    assert parse_dimension("momentum", "0.9") == 0.9
    assert parse_dimension("optimizer", "adam") == "adam"


@pytest.mark.parametrize("key, spec, message", [
    ("lr", "1e-1:1e-4", "lr range needs LOW < HIGH, got '1e-1:1e-4'"),
    ("lr", "a:b", "lr range bounds must be numbers, got 'a:b'"),
    ("lr", "0:1", "so LOW must be > 0"),
    ("lr", "1e-4:1:lin", "lr is always searched on a log scale"),
    ("weight_decay", "0:1e-3", "use a list such as 0,1e-4,1e-3 to include 0"),
    ("batch_size", "16.5:64", "batch_size takes integers, got the range '16.5:64'"),
    ("momentum", "0.1:0.2:0.3", "momentum range must be LOW:HIGH"),
    ("optimizer", "sgd,sgd", "optimizer list repeats a value"),
    ("lr", "", "lr needs a range such as 1e-4:1e-1"),
])
def test_bad_specs_name_the_key_and_the_text(key, spec, message):
    with pytest.raises(SearchSpaceError) as e:
        parse_dimension(key, spec)
    assert message in str(e.value)


def test_grid_is_geometric_for_log_ranges_with_exact_ends():
    d = parse_dimension("lr", "1e-4:1e-1")
    g = d.grid(4)
    assert g[0] == 1e-4 and g[-1] == 1e-1
    ratios = [g[i + 1] / g[i] for i in range(3)]
    assert all(math.isclose(r, 10.0, rel_tol=1e-5) for r in ratios)
    assert parse_dimension("momentum", "0:0.9:lin").grid(4) == [0.0, 0.3, 0.6, 0.9]
    assert parse_dimension("batch_size", "16:128").grid(4) == [16, 32, 64, 128]


def test_grid_drops_hyperparameters_an_optimizer_lacks_and_holds_each_point_once():
    space = SearchSpace([parse_dimension("optimizer", "sgd,adam"), parse_dimension("lr", "1e-3,1e-2"),
                         parse_dimension("momentum", "0,0.9")])
    grid = space.grid(3)
    # sgd: 2 lr x 2 momentum; adam: 2 lr (no momentum)
    assert len(grid) == 6
    assert all("momentum" not in p for p in grid if p["optimizer"] == "adam")
    assert all("momentum" in p for p in grid if p["optimizer"] == "sgd")
    assert len({point_key(p) for p in grid}) == 6


def test_random_draws_are_log_uniform_and_reproducible():
    space = SearchSpace([parse_dimension("lr", "1e-5:1e-1")])
    a = space.sample(400, seed=3)
    b = space.sample(400, seed=3)
    assert a == b
    assert a != space.sample(400, seed=4)
    logs = [math.log10(p["lr"]) for p in a]
    assert all(-5 <= v <= -1 for v in logs)
    # log-uniform: each decade gets about a quarter of the draws (uniform would put ~90% in the top decade)
    counts = [sum(1 for v in logs if lo <= v < lo + 1) for lo in (-5, -4, -3, -2)]
    assert all(60 <= c <= 140 for c in counts), counts


def test_a_hyperparameter_no_searched_optimizer_takes_is_refused():
    with pytest.raises(SearchSpaceError, match="momentum varies but no optimizer searched takes it"):
        SearchSpace([parse_dimension("momentum", "0,0.9")], fixed={"optimizer": "adam"})
    with pytest.raises(SearchSpaceError, match="unknown optimizer 'adamx'"):
        SearchSpace([parse_dimension("optimizer", "sgd,adamx")])
    with pytest.raises(SearchSpaceError, match="the search space is empty"):
        SearchSpace([])


def test_dimensions_round_trip_through_dicts():
    for d in (parse_dimension("lr", "1e-4:1e-1"), parse_dimension("batch_size", "16:64"),
              parse_dimension("optimizer", "sgd,adam")):
        assert Dimension.from_dict(d.to_dict()) == d
    space = SearchSpace([parse_dimension("lr", "1e-4:1e-1"), parse_dimension("optimizer", "sgd,adam")],
                        fixed={"epochs": 2})
    again = SearchSpace.from_dict(space.to_dict())
    assert again.grid(3) == space.grid(3)
