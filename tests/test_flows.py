"""flow.yaml schema, hardening and the safe graph parser (no NATS, no worker)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pyoco.core.engine import Engine
from pyoco.core.models import RunContext, Task
from pyoco.trace.backend import TraceBackend

from pyoco_es.core.errors import PayloadTooLarge, ValidationError
from pyoco_es.flows.graph import build_flow, plan_graph
from pyoco_es.flows.yaml import parse_workflow_yaml

GOOD = textwrap.dedent(
    """\
    version: 1
    flow:
      graph: |
        add_one >> to_text
      defaults: {x: 1}
    tasks:
      add_one: {callable: "examples.tasks:add_one"}
      to_text: {callable: "examples.tasks:to_text", inputs: {value: "$node.add_one.output"}}
    """
)


def doc(body: str) -> bytes:
    return textwrap.dedent(body).encode()


class TestSchema:
    def test_good_document(self) -> None:
        """A valid file gives its sha256, size, defaults, graph and tasks."""
        d = parse_workflow_yaml(GOOD.encode(), max_bytes=10_000)
        assert d.size == len(GOOD.encode())
        assert len(d.sha256) == 64
        assert d.flow_defaults == {"x": 1}
        assert d.graph.strip() == "add_one >> to_text"
        assert list(d.tasks) == ["add_one", "to_text"]
        assert d.tasks["to_text"].inputs == {"value": "$node.add_one.output"}
        assert d.task_names == ("add_one", "to_text")

    def test_cached_result_is_not_shared_mutable(self) -> None:
        """The cache hands out a fresh defaults dict each time (callers may merge params into it)."""
        a = parse_workflow_yaml(GOOD.encode(), max_bytes=10_000)
        a.flow_defaults["x"] = 99
        b = parse_workflow_yaml(GOOD.encode(), max_bytes=10_000)
        assert b.flow_defaults == {"x": 1}

    def test_too_large(self) -> None:
        with pytest.raises(PayloadTooLarge):
            parse_workflow_yaml(GOOD.encode(), max_bytes=10)

    @pytest.mark.parametrize(
        ("raw", "fragment"),
        [
            (b"", "empty"),
            (b"   \n# only a comment\n", "empty"),
            (b"\xff\xfe\x00bad", "UTF-8"),
            (b"- a\n- b\n", "root must be a mapping"),
            (b"just a string", "root must be a mapping"),
            (doc("flows: {}\nflow: {graph: a}\n"), "flows"),
            (doc("discovery: {}\nflow: {graph: a}\n"), "discovery"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\nextra: 1\n"), "extra (line 3): unknown key"),
            (doc("tasks: {a: {callable: 'm:f'}}\n"), "flow: required"),
            (doc("flow: [a]\n"), "flow (line 1): must be a mapping"),
            (doc("flow: {graph: a, name: x}\ntasks: {a: {callable: 'm:f'}}\n"), "flow.name"),
            (doc("flow: {graph: ''}\n"), "flow.graph"),
            (doc("flow: {graph: 3}\n"), "flow.graph"),
            (doc("flow: {graph: a, defaults: [1]}\ntasks: {a: {callable: 'm:f'}}\n"), "flow.defaults"),
            (doc("version: abc\nflow: {graph: a}\n"), "version"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f', retries: '3'}}\n"), "tasks.a.retries"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f', fail_policy: isolate}}\n"), "tasks.a.fail_policy"),
            (doc("flow: {graph: a}\ntasks: {a: {inputs: {}}}\n"), "`callable` is required"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'nocolon'}}\n"), "tasks.a.callable"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'a:b:c'}}\n"), "tasks.a.callable"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f', use: 'x/y'}}\n"), "tasks.a.use"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f', inputs: [1]}}\n"), "tasks.a.inputs"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f', outputs: 'x'}}\n"), "tasks.a.outputs"),
            (doc("flow: {graph: a}\ntasks: {a: [1]}\n"), "tasks.a"),
            (doc("flow: {graph: a}\ntasks: {'a-b': {callable: 'm:f'}}\n"), "identifiers"),
            (doc("flow: {graph: a}\ntasks: {flow: {callable: 'm:f'}}\n"), "identifiers"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\nruntime: {other: 1}\n"), "runtime.other"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\nruntime: {expose_env: X}\n"), "runtime.expose_env"),
            (
                doc("flow: {graph: a}\ntasks: {a: {callable: 'json:dumps', inputs: {obj: '$env.SECRET'}}}\n"),
                "tasks.a.inputs.obj",
            ),
            (doc("flow: {graph: a, defaults: {x: .nan}}\ntasks: {a: {callable: 'm:f'}}\n"), "flow.defaults.x"),
            (doc("flow: {graph: a}\ntasks: {a: {callable: 'm:f'}}\nflow: {graph: a}\n"), "duplicate key `flow`"),
            (doc("flow: {graph: a, defaults: {1: x}}\ntasks: {a: {callable: 'm:f'}}\n"), "must be a string"),
            (doc("flow: {graph: a, defaults: {on: x}}\ntasks: {a: {callable: 'm:f'}}\n"), "must be a string"),
            (doc("flow: {graph: a, defaults: {x: !!python/object/apply:os.system [echo]}}\n"), "python/object"),
            (doc("flow: {graph: a, defaults: {x: !!binary aGk=}}\n"), "binary"),
            (doc("flow: {graph: a, defaults: {x: !custom 1}}\n"), "!custom"),
            (doc("flow: {graph: a\n"), "yaml:"),
            (doc("flow: {graph: zzz}\ntasks: {a: {callable: 'm:f'}}\n"), "unknown task 'zzz'"),
        ],
    )
    def test_refused(self, raw: bytes, fragment: str) -> None:
        """Every bad document is a ValidationError naming the problem (key path / line)."""
        with pytest.raises(ValidationError) as info:
            parse_workflow_yaml(raw, max_bytes=100_000)
        assert not isinstance(info.value, PayloadTooLarge)
        assert fragment in info.value.message, info.value.message

    def test_line_numbers(self) -> None:
        raw = doc(
            """\
            flow:
              graph: a
            tasks:
              a:
                callable: "m:f"
                retries: two
            """
        )
        with pytest.raises(ValidationError, match=r"tasks\.a\.retries \(line 6\)"):
            parse_workflow_yaml(raw, max_bytes=0)

    def test_alias_bomb(self) -> None:
        """A billion-laughs document is refused before it is expanded."""
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        for i in range(1, 9):
            prev = f"*a{i - 1}"
            lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
        raw = ("flow: {graph: t, defaults: {bomb: *a8}}\ntasks: {t: {callable: 'm:f'}}\nanchors:\n" + "\n".join(
            "  " + line for line in lines
        )).encode()
        with pytest.raises(ValidationError, match="alias|expands"):
            parse_workflow_yaml(raw, max_bytes=0)

    def test_too_many_aliases(self) -> None:
        raw = ("flow: {graph: t, defaults: {v: &v 1, l: [" + ", ".join(["*v"] * 200) + "]}}\n").encode()
        with pytest.raises(ValidationError, match="too many aliases"):
            parse_workflow_yaml(raw, max_bytes=0)

    def test_deep_nesting(self) -> None:
        raw = ("flow: {graph: t, defaults: {v: " + "[" * 200 + "]" * 200 + "}}\n").encode()
        with pytest.raises(ValidationError, match="nesting"):
            parse_workflow_yaml(raw, max_bytes=0)

    def test_exposed_env_and_timestamps(self) -> None:
        """``$env`` is fine for exposed names; dates stay strings (params are JSON)."""
        raw = doc(
            """\
            flow: {graph: a, defaults: {day: 2024-01-02}}
            tasks: {a: {callable: 'json:dumps', inputs: {obj: '$env.HOME'}}}
            runtime: {expose_env: [HOME]}
            """
        )
        d = parse_workflow_yaml(raw, max_bytes=0)
        assert d.flow_defaults == {"day": "2024-01-02"}
        assert d.expose_env == ("HOME",)


DECLARED = ("a", "b", "c", "d", "item")


def edges_of(graph: str, declared: tuple[str, ...] = DECLARED) -> dict[str, tuple[list[str], str]]:
    plan = plan_graph(graph, declared)
    flow = build_flow(plan, lambda n: Task(func=lambda: None, name=n))
    return {t.name: (sorted(d.name for d in t.dependencies), t.trigger_policy) for t in flow.tasks}


class TestGraph:
    @pytest.mark.parametrize(
        ("graph", "expected"),
        [
            ("a >> b", {"a": ([], "ALL"), "b": (["a"], "ALL")}),
            ("a", {"a": ([], "ALL")}),
            ("flow >> a >> b", {"a": ([], "ALL"), "b": (["a"], "ALL")}),
            (
                "flow >> a >> (b & c) >> d",
                {"a": ([], "ALL"), "b": (["a"], "ALL"), "c": (["a"], "ALL"), "d": (["b", "c"], "ALL")},
            ),
            ("(a | b) >> c", {"a": ([], "ALL"), "b": ([], "ALL"), "c": (["a", "b"], "ANY")}),
            ("a & b & c", {"a": ([], "ALL"), "b": ([], "ALL"), "c": ([], "ALL")}),
            ("a >> (b & c)", {"a": ([], "ALL"), "b": (["a"], "ALL"), "c": (["a"], "ALL")}),
            ("flow >> a\nflow >> b  # continues after a, as under exec", {"a": ([], "ALL"), "b": (["a"], "ALL")}),
            ("# comment\n\n  a >> b\n", {"a": ([], "ALL"), "b": (["a"], "ALL")}),
        ],
    )
    def test_operator_form(self, graph: str, expected: dict[str, tuple[list[str], str]]) -> None:
        """Operator graphs build the same edges pyoco's operators give; unnamed tasks are left out."""
        assert edges_of(graph) == expected

    def test_dsl_form(self) -> None:
        """pyoco 0.7+ DSL (aliases, control flow) goes through pyoco's own parser."""
        plan = plan_graph("first: a >> second: a >> repeat(count=2){ b }", DECLARED)
        assert plan.form == "dsl"
        assert plan.task_names == ("first", "second", "b")
        assert plan.declared == ("a", "b")
        flow = build_flow(plan, lambda n: Task(func=lambda: None, name=n))
        assert flow.has_control_flow()

    def test_fresh_tasks_each_build(self) -> None:
        """Building twice never leaves stale edges (pyoco stores edges on Task objects)."""
        plan = plan_graph("a >> b", DECLARED)
        made: list[Task] = []

        def make(n: str) -> Task:
            made.append(Task(func=lambda: None, name=n))
            return made[-1]

        build_flow(plan, make)
        build_flow(plan, make)
        assert len(made) == 4 and len({id(t) for t in made}) == 4

    @pytest.mark.parametrize(
        ("graph", "fragment"),
        [
            ("a >> zzz", "unknown task 'zzz'"),
            ("__import__('os').system('id')", "function call"),
            ("os.system", "attribute access"),
            ("a + b", "operator `+`"),
            ("a >> 'b'", "a literal"),
            ("a >> b[0]", "subscript"),
            ("x = a", "statement"),
            ("import os", "statement"),
            ("(lambda: a)()", "function call"),
            ("a >> flow", "may only start"),
            ("flow >> a >> b & c", "bind more loosely"),
            ("a >> b >> a", "cycle a >> b >> a"),
            ("a >> a", "depends on itself"),
            ("a >> (b", "invalid operator expression"),
            ("a >>", "Expected term"),
            ("switch(on={{$env.SECRET}}){ 'x': a; default: b; }", "expose_env"),
            ("switch(on={{$ctx.params.__class__}}){ 'x': a; default: b; }", "`__`"),
            ("a >> b >> c >> nope_task", "unknown task 'nope_task'"),
            ("repeat(count=2){ zz }", "unknown task 'zz'"),
            ("first: a >> first: b", "Duplicate node name"),
            ("pipe(nope)", "pipe"),
        ],
    )
    def test_refused(self, graph: str, fragment: str) -> None:
        """Anything outside both grammars is refused with the offending token named."""
        with pytest.raises(ValidationError) as info:
            plan_graph(graph, DECLARED)
        assert fragment in info.value.message, info.value.message
        assert info.value.message.startswith("graph")

    def test_runs_in_pyoco(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A fan-out/join operator graph really executes in pyoco's engine in dependency order."""
        monkeypatch.chdir(tmp_path)  # pyoco's Context creates ./artifacts in the working directory
        order: list[str] = []

        def make(n: str) -> Task:
            return Task(func=lambda n=n: order.append(n), name=n)

        class Quiet(TraceBackend):
            def on_flow_start(self, flow_name: str, run_id: str | None = None) -> None: ...
            def on_flow_end(self, flow_name: str) -> None: ...
            def on_node_start(self, node_name: str) -> None: ...
            def on_node_end(self, node_name: str, duration_ms: float) -> None: ...
            def on_node_error(self, node_name: str, error: Exception) -> None: ...

        flow = build_flow(plan_graph("flow >> a >> (b & c) >> d", DECLARED), make)
        Engine(trace_backend=Quiet()).run(flow, {}, RunContext())
        assert order[0] == "a" and order[-1] == "d" and sorted(order[1:3]) == ["b", "c"]
        assert "item" not in order


class TestLoaderEdges:
    @pytest.mark.parametrize(
        ("raw", "fragment"),
        [
            (b"flow: {graph: a, defaults: {x: *nope}}\n", "undefined alias"),
            (b"flow: &f {graph: a, defaults: {self: *f}}\n", "recursive alias"),
            (b"flow: {graph: a}\n---\nflow: {graph: b}\n", "single document"),
            (b"a: [1, 2\n", "yaml:"),
        ],
    )
    def test_refused(self, raw: bytes, fragment: str) -> None:
        with pytest.raises(ValidationError) as info:
            parse_workflow_yaml(raw, max_bytes=0)
        assert fragment in info.value.message, info.value.message

    def test_large_document_is_fast_enough(self) -> None:
        """A 256 KB flow.yaml (the default limit) parses in well under a second (libyaml)."""
        import time

        lines = ["flow:", "  graph: a", "  defaults:"]
        lines += [f"    k{i}: {{name: v{i}, list: [1, 2, 3], nested: {{x: {i}}}}}" for i in range(4000)]
        lines += ["tasks:", "  a: {callable: 'm:f'}"]
        raw = "\n".join(lines).encode()
        started = time.perf_counter()
        d = parse_workflow_yaml(raw, max_bytes=0)
        assert len(d.flow_defaults) == 4000
        assert time.perf_counter() - started < 5.0  # ~0.4 s here; generous for slow CI machines


class TestGraphFuzz:
    """Whatever the text, the graph parser answers with a plan or a ValidationError (a 422),
    never another exception (a 500) and never by running anything."""

    from hypothesis import given, settings
    from hypothesis import strategies as st

    TOKENS = ["a", "b", "c", "flow", ">>", "&", "|", "(", ")", " ", "\n", "#", ":", "{", "}", "zz",
              "repeat(count=2)", "switch(on={{$ctx.params.m}})", "'x'", ";", "default", "pipe(p)", "+", ".", "1", "{{", "}}"]

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12))
    def test_any_text(self, parts: list[str]) -> None:
        text = "".join(parts)
        try:
            plan = plan_graph(text, ("a", "b", "c"), pipes={"p": "a"})
        except ValidationError:
            return
        assert plan.task_names
        flow = build_flow(plan, lambda n: Task(func=lambda: None, name=n))
        assert {t.name for t in flow.tasks} == set(plan.task_names)
