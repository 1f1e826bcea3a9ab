"""The OpenAPI schema documents every route, and the hand-written parsers agree with it."""

from __future__ import annotations

import pytest
from conftest import Client
from pydantic import BaseModel

from service import schemas

CLF_ROW = [0.1, 0.2, 0.3, 0.4]


def url_for(path: str) -> str:
    return path.replace("{name}", "reg").replace("{version}", "1")


def test_every_gateway_route_is_in_the_schema_with_its_bodies(client: Client) -> None:
    schema = client.get("/openapi.json").json()
    for path in schemas.ROUTES:
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        answer = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        for ref in (body, answer):
            assert ref.rsplit("/", 1)[1] in schema["components"]["schemas"], ref


@pytest.mark.parametrize("path", sorted(schemas.ROUTES))
def test_the_schemas_example_is_accepted_by_the_real_parser(client: Client, path: str) -> None:
    _, body, answer = schemas.ROUTES[path]
    example = body.model_json_schema()["example"]
    body.model_validate(example)  # the example is what its own model says
    response = client.post(url_for(path), json=example)
    assert response.status_code == 200, response.text
    answer.model_validate(response.json())


def answers(client: Client) -> list[tuple[type[BaseModel], dict]]:
    v2 = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": CLF_ROW}]}
    return [
        (schemas.PredictAnswer, client.post("/v1/models/clf:predict",
                                            json={"instances": [CLF_ROW]}).json()),
        (schemas.AcquireAnswer, client.post("/v1/models/clf:acquire",
                                            json={"instances": [CLF_ROW] * 3}).json()),
        (schemas.SampleAnswer, client.post("/v1/models/clf:sample",
                                           json={"instances": [CLF_ROW]}).json()),
        (schemas.ExplainAnswer, client.post("/v1/models/clf:explain",
                                            json={"instances": [CLF_ROW] * 2}).json()),
        (schemas.ExplainAnswer, client.post(
            "/v1/models/clf:explain",
            json={"instances": [CLF_ROW], "parameters": {"method": "gradient_x_input"}}).json()),
        (schemas.ErrorAnswer, client.post("/v1/models/clf:explain",
                                          json={"instances": [CLF_ROW],
                                                "parameters": {"outputs": ["x"]}}).json()),
        (schemas.InferAnswer, client.post("/v2/models/clf/infer", json=v2).json()),
        (schemas.ErrorAnswer, client.post("/v1/models/clf:predict", json={"x": 1}).json()),
        (schemas.ErrorAnswer, client.post("/v1/models/clf:predict",
                                          json={"instances": [[1.0], "a"]}).json()),
        (schemas.V2Error, client.post("/v2/models/clf/infer", json={"inputs": []}).json()),
    ]  # fmt: skip


def test_real_answers_validate_against_the_documented_models(client: Client) -> None:
    """The models forbid fields they do not name: an undocumented field fails here."""
    for model, answer in answers(client):
        model.model_validate(answer)
    regression = client.post("/v1/models/reg:predict", json={"instances": [[0.0, 1.0, 2.0]]})
    schemas.PredictAnswer.model_validate(regression.json())
