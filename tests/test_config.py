import json
import re

import pytest

from distill.config import ConfigError, DistillConfig, load_config

BASE = """
prompt: prompts/sentiment_binary.yaml
data:
  pool_path: data/movie/pool.parquet
"""


def write(tmp_path, body):
    p = tmp_path / "c.yaml"
    p.write_text(body)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        ["teacher.samples=5", "client.requests_per_minute=120", 'teacher.stop=["\\n", "END"]', "data.pool_limit=10"],
    )
    assert cfg.teacher.samples == 5 and cfg.client.requests_per_minute == 120
    assert cfg.teacher.stop == ["\n", "END"] and cfg.data.pool_limit == 10


def test_unknown_keys_rejected_with_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + "teacher:\n  sampels: 3\n"))
    assert "teacher.sampels" in str(e.value) and "c.yaml" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["teacher.tempreature=1"])
    assert "teacher.tempreature" in str(e.value)


def test_bounds(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["teacher.samples=0"])
    assert "teacher.samples" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["teacher.local=false"])
    assert "base_url" in str(e.value)
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, BASE), ["teacher.base_url=ftp://x"])


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["teacher.samples"])


def test_every_field_has_a_description():
    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(DistillConfig)


def test_shipped_configs_validate():
    from pathlib import Path

    from tasks.accounting.pricing import load_table

    seen = 0
    for p in Path(__file__).resolve().parents[1].glob("configs/*.yaml"):
        if p.name == "prices.yaml":  # the price table, not a run config
            assert len(load_table(p)) >= 5
            continue
        cfg = load_config(p)
        seen += 1
        # every shipped config prices its teacher (an unpriced one would fail before its first request)
        from tasks.accounting.pricing import resolve_prices

        assert resolve_prices(cfg.teacher, cfg.pricing)
    assert seen >= 2


def test_config_is_a_prefect_parameter_schema():
    """The flow's parameter renders as a form: Prefect builds a JSON schema with our fields."""
    from prefect.utilities.callables import parameter_schema

    from flows.annotate import annotate_flow

    schema = parameter_schema(annotate_flow.fn).model_dump()
    defs = schema.get("definitions") or schema.get("$defs") or {}
    assert "config" in schema["properties"]
    assert "TeacherConfig" in defs and "samples" in defs["TeacherConfig"]["properties"]
    assert "BudgetConfig" in defs and "max_usd" in defs["BudgetConfig"]["properties"]
    assert "dry_run" in schema["properties"]


def test_task_generate_defaults_to_a_lora_student_and_the_medoid() -> None:
    from distill.config import GeneratorStudentConfig, StudentConfig, config_from_dict

    base = {"prompt": "prompts/sentiment_binary.yaml", "data": {"pool_path": "pool.parquet"}}
    classify = config_from_dict(base)
    assert isinstance(classify.student, StudentConfig) and classify.vote.aggregation.value == "mean_probability"
    gen = config_from_dict({**base, "task": "generate", "student": {"epochs": 1}})
    assert isinstance(gen.student, GeneratorStudentConfig) and gen.student.epochs == 1
    assert gen.vote.aggregation.value == "medoid"
    # the union survives the JSON round trip a Prefect flow-run parameter takes
    from distill.config import DistillConfig

    again = DistillConfig.model_validate_json(gen.model_dump_json())
    assert isinstance(again.student, GeneratorStudentConfig)


@pytest.mark.parametrize(
    "extra, named",
    [
        (
            {"task": "generate", "student": {"kind": "classifier"}},
            "student.kind 'classifier' does not suit task 'generate'",
        ),
        ({"student": {"kind": "lora_generator"}}, "student.kind 'lora_generator' does not suit task 'classify'"),
        ({"vote": {"aggregation": "medoid"}}, "vote.aggregation 'medoid' does not suit task 'classify'"),
        ({"task": "generate", "student": {"soft_label_weight": 0.5}}, "student.lora_generator.soft_label_weight"),
        ({"student": {"kind": "svm"}}, "'svm'"),
    ],
)
def test_a_student_or_aggregation_that_does_not_suit_the_task_is_an_error_naming_the_field(extra, named) -> None:
    from distill.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=re.escape(named)):
        config_from_dict({"prompt": "prompts/sentiment_binary.yaml", "data": {"pool_path": "pool.parquet"}, **extra})


def test_the_prefect_form_offers_both_students() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.distillation import distill_flow

    schema = parameter_schema(distill_flow.fn).model_dump()
    student = schema["definitions"]["DistillConfig"]["properties"]["student"]
    refs = {a["$ref"].rsplit("/", 1)[-1] for a in student["anyOf"]}
    assert refs == {"StudentConfig", "GeneratorStudentConfig"}
    task = schema["definitions"]["DistillConfig"]["properties"]["task"]
    assert "generate" in json.dumps(schema["definitions"]["TaskType"]) and task
