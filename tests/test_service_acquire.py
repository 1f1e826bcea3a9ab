""":acquire: the points of a pool an active learner should label next, by their uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Client

POOL = np.random.default_rng(0).normal(0, 2, (40, 4)).round(3).tolist()
PARAMETERS = {"num_samples": 200, "seed": 11}


def acquire(client: Client, name: str, **parameters: object):
    body = {"instances": POOL, "parameters": {**PARAMETERS, **parameters}}
    return client.post(f"/v1/models/{name}:acquire", json=body)


@pytest.mark.parametrize(
    ("acquisition", "field"),
    [("bald", "mutual_information"), ("max_entropy", "entropy"),
     ("variation_ratios", "variation_ratio")],
)  # fmt: skip
def test_a_classifier_returns_the_k_highest_scoring_points(
    client: Client, acquisition: str, field: str
) -> None:
    """The k best are those whose :predict summary (same seed, same draws) scores highest,
    best first; BALD's are the points with the most mutual information, not random ones."""
    response = acquire(client, "clf", k=5, acquisition=acquisition)
    assert response.status_code == 200, response.text
    answer = response.json()
    body = {"instances": POOL, "parameters": PARAMETERS}
    rows = client.post("/v1/models/clf:predict", json=body).json()["predictions"]
    scores = np.array([row[field] for row in rows])
    expected = sorted(range(len(POOL)), key=lambda i: (-scores[i], i))[:5]
    assert answer["indices"] == expected
    assert answer["scores"] == [scores[i] for i in expected]
    assert (answer["acquisition"], answer["num_samples"], answer["seed"]) == (acquisition, 200, 11)
    assert min(answer["scores"]) >= np.quantile(scores, 0.85)


def test_a_regressor_ranks_by_epistemic_variance_by_default(client: Client) -> None:
    pool = [row[:3] for row in POOL]
    body = {"instances": pool, "parameters": {**PARAMETERS, "k": 3}}
    answer = client.post("/v1/models/reg:acquire", json=body).json()
    rows = client.post(
        "/v1/models/reg:predict", json={"instances": pool, "parameters": PARAMETERS}
    ).json()["predictions"]
    scores = [row["epistemic_variance"][0] for row in rows]
    assert answer["acquisition"] == "epistemic_variance"
    assert answer["indices"] == sorted(range(len(pool)), key=lambda i: -scores[i])[:3]


@pytest.mark.parametrize(
    ("name", "parameters", "words"),
    [
        ("clf", {"k": 41}, "k must be an integer from 1 to 40, the number of instances"),
        ("clf", {"k": 0}, "k must be an integer from 1 to 40"),
        ("clf", {"acquisition": "random"}, "one of bald, max_entropy, variation_ratios"),
        ("reg", {"acquisition": "bald"}, "one of epistemic_variance for a regression model"),
        ("clf", {"credible_levels": [0.9]}, "unknown parameter 'credible_levels'"),
    ],
)
def test_bad_acquire_requests_are_422_naming_the_problem(
    client: Client, name: str, parameters: dict, words: str
) -> None:
    pool = POOL if name == "clf" else [row[:3] for row in POOL]
    body = {"instances": pool, "parameters": parameters}
    response = client.post(f"/v1/models/{name}:acquire", json=body)
    assert response.status_code == 422
    assert words in response.text
