"""The layout: no import circles between the project's modules (imports inside functions count), and each file
holds what its name promises (docs/implementation-details.md, the layout; README's file map)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["step_mdp", "credit", "steppo_loss", "model", "unpad", "rollout", "scale", "records", "cli", "learner", "train"]


def modules() -> dict[str, str]:
    """module name -> file, for the core files and envs/*.py."""
    out = {m: os.path.join(ROOT, m + ".py") for m in CORE}
    for f in sorted(os.listdir(os.path.join(ROOT, "envs"))):
        if f.endswith(".py"):
            name = "envs" if f == "__init__.py" else "envs." + f[:-3]
            out[name] = os.path.join(ROOT, "envs", f)
    return out


def imports(path: str, known) -> set[str]:
    """The project modules `path` imports anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
        found |= {n for n in names if n in known}
    return found


def test_the_import_graph_has_no_circles():
    mods = modules()
    graph = {m: imports(p, mods) - {m} for m, p in mods.items()}
    for m in graph:  # a submodule imports its package's __init__ implicitly; that is no circle of ours
        graph[m] -= {"envs"} if m.startswith("envs.") else set()
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, f"import circles: {cycle}"


def test_each_module_holds_what_its_name_promises():
    text = {m: open(os.path.join(ROOT, m + ".py")).read() for m in CORE}
    assert len(text["scale"].splitlines()) <= 450
    for word in ("argparse", "Tracker", "matplotlib", "signal.signal", "def make_engine"):
        assert word not in text["scale"], word  # no command line, tracking, plotting, signals or engines in scale.py
    for word in ("def step_logprobs", "def critic_outputs", "def boundary_values", ".logits", "input_ids="):
        assert word not in text["steppo_loss"], word  # tensor math only: no module forward
    for word in ("import rollout", "from rollout", "checkpoint", "Tracker", "envs"):
        assert word not in text["learner"], word  # trajectories in, weights out: no rollouts, checkpoints, logging, envs
    assert len(text["train"].splitlines()) <= 450  # the loop; what one iteration's learning does is learner.py


def test_the_readme_states_the_core_line_count():
    import re
    n = sum(len(open(os.path.join(ROOT, m + ".py")).read().splitlines())
            for m in ("step_mdp", "rollout", "credit", "steppo_loss", "learner", "train"))
    said = re.search(r"the core \(([^)]*)\) is ~([\d,]+) lines", open(os.path.join(ROOT, "README.md")).read())
    assert said, "README: 'the core (files) is ~N lines'"
    assert abs(int(said.group(2).replace(",", "")) - n) <= 50, (said.group(0), n)
