"""One config schema: ServeConfig's sections are the components' own pydantic models, so a
setting is declared (default, bounds, description) once. A dataclass copying a pydantic model
field by field drifts (``instances`` defaulted to 2 in ServeConfig and to 1 in the batcher)."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import yaml

from catcascade.serving.batcher import BatchingConfig, DynamicBatcher
from catcascade.serving.circuit_breaker import BreakerConfig, CircuitBreaker
from catcascade.serving.config import ServeConfig
from catcascade.serving.traffic.admission import AdmissionConfig, AdmissionController

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "service.example.yaml"

# Config dataclasses still allowed in serving/, each with why:
ALLOWED_CONFIG_DATACLASSES: set[tuple[str, str]] = set()  # (file, class) a reason would have to justify


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return name == "dataclass"


def _classes(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            yield node


def _fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            and n.target.id != "model_config"}


def _serving_classes():
    """(path, class node, is dataclass, is pydantic model) for every class in serving/."""
    for path in sorted((ROOT / "serving").rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        rel = path.relative_to(ROOT).as_posix()
        for cls in _classes(path):
            is_dc = any(_is_dataclass_decorator(d) for d in cls.decorator_list)
            is_model = any((b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")) == "BaseModel"
                           for b in cls.bases)
            yield rel, cls, is_dc, is_model


def test_no_config_dataclasses_beside_the_pydantic_schema():
    found = {(rel, cls.name) for rel, cls, is_dc, _ in _serving_classes()
             if is_dc and cls.name.endswith(("Config", "Settings"))}
    assert found - ALLOWED_CONFIG_DATACLASSES == set()


def test_no_dataclass_mirrors_a_pydantic_config_model():
    """Whatever its name: a dataclass sharing most of its fields (at least 3) with a pydantic
    model is a second copy of that schema."""
    classes = list(_serving_classes())
    models = {(rel, cls.name): _fields(cls) for rel, cls, _, is_model in classes if is_model}
    mirrors = []
    for rel, cls, is_dc, _ in classes:
        fields = _fields(cls)
        if not is_dc or (rel, cls.name) in ALLOWED_CONFIG_DATACLASSES or not fields:
            continue
        for model, model_fields in models.items():
            shared = fields & model_fields
            if len(shared) >= 3 and len(shared) * 2 >= len(fields):
                mirrors.append(((rel, cls.name), model, sorted(shared)))
    assert mirrors == []


def test_the_mirror_check_sees_a_mirror(tmp_path):
    """The scan above would catch the dataclass this change removed (the check can fail)."""
    source = tmp_path / "old.py"
    source.write_text("from dataclasses import dataclass\n"
                      "from pydantic import BaseModel\n"
                      "@dataclass(frozen=True)\nclass BatcherConfig:\n"
                      "    max_batch_size: int = 16\n    max_queue_size: int = 256\n    instances: int = 1\n"
                      "class BatchingConfig(BaseModel):\n"
                      "    max_batch_size: int = 16\n    max_queue_size: int = 256\n    instances: int = 2\n")
    dc, model = list(_classes(source))
    assert any(_is_dataclass_decorator(d) for d in dc.decorator_list)
    assert len(_fields(dc) & _fields(model)) == 3


@pytest.mark.parametrize("section,model", [("batching", BatchingConfig), ("breaker", BreakerConfig),
                                           ("admission", AdmissionConfig)])
def test_serve_config_sections_are_the_component_models(section, model):
    assert ServeConfig.model_fields[section].annotation is model


def test_components_take_the_same_models():
    hints = {cls: typing.get_type_hints(cls.__init__)["config"]
             for cls in (DynamicBatcher, CircuitBreaker, AdmissionController)}
    assert hints == {DynamicBatcher: BatchingConfig, CircuitBreaker: BreakerConfig,
                     AdmissionController: AdmissionConfig}


def test_serve_config_defaults_are_the_component_defaults(tmp_path):
    cfg = ServeConfig(bundle=tmp_path)
    batcher = DynamicBatcher(lambda x: x)
    assert batcher.config == cfg.batching and cfg.batching.instances == 2  # one default, not 2 and 1
    assert CircuitBreaker().config == cfg.breaker
    assert AdmissionController().config == cfg.admission


def test_component_configs_refuse_unknown_keys():
    """A misspelt YAML key is an error at start, not a silently ignored setting."""
    for model, key in ((BatchingConfig, "instance"), (BreakerConfig, "probe_with_requests"),
                       (AdmissionConfig, "safety")):
        with pytest.raises(ValueError, match=rf"{key}\n  Extra inputs are not permitted"):
            model(**{key: 1})


@pytest.mark.parametrize("section,model", [("batching", BatchingConfig), ("breaker", BreakerConfig),
                                           ("admission", AdmissionConfig)])
def test_example_yaml_keys_load_into_the_component_models(section, model):
    """configs/service.example.yaml documents every key of these sections, and each one
    reaches the component's model with its value."""
    data = yaml.safe_load(EXAMPLE.read_text())
    cfg = ServeConfig.model_validate(data)
    keys = data[section]
    assert set(keys) == set(model.model_fields)
    loaded = getattr(cfg, section)
    assert isinstance(loaded, model)
    assert {k: getattr(loaded, k) for k in keys} == keys


def test_changed_yaml_values_reach_the_components(tmp_path):
    cfg = ServeConfig.model_validate({
        "bundle": str(tmp_path), "batching": {"instances": 3, "max_batch_size": 5},
        "breaker": {"failure_threshold": 7, "health_period_s": 2, "health_idle_period_s": 1, "health_timeout_s": 0.5},
        "admission": {"safety_factor": 2.0, "enabled": False}})
    assert DynamicBatcher(lambda x: x, cfg.batching).config.instances == 3
    breaker = CircuitBreaker(cfg.breaker, probe_with_requests=False)
    assert breaker.config.failure_threshold == 7 and not breaker.probe_with_requests
    from catcascade.serving.traffic.vlm_watchdog import VlmWatchdog

    async def check():
        return None

    dog = VlmWatchdog(check, breaker)
    assert (dog.period_s, dog.idle_period_s, dog.timeout_s) == (2, 2, 0.5)  # idle pace at least the period
    admission = AdmissionController(cfg.admission)
    assert admission.config.safety_factor == 2.0 and not admission.config.enabled
