"""`tiermap.jit` behaves as JAX users expect of `jax.jit`, and plans once per input signature."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiermap
from tiermap import Plan, pipeline

# Small programs and short limits keep each plan well under a second.
FAST = {"time_limit_s": 2.0}


@pytest.fixture
def plan_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the programs `pipeline.plan` was asked to plan during the test."""
    calls: list[str] = []
    real = pipeline.plan

    def counting(fn_or_program: Any, *args: Any, **kwargs: Any) -> Plan:
        calls.append(getattr(fn_or_program, "__name__", "program"))
        return real(fn_or_program, *args, **kwargs)

    monkeypatch.setattr(pipeline, "plan", counting)
    yield calls


def mlp(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.tanh(x @ w)


X = jnp.linspace(-1.0, 1.0, 32 * 16, dtype=jnp.float32).reshape(32, 16)
W = jnp.linspace(-0.5, 0.5, 16 * 8, dtype=jnp.float32).reshape(16, 8)


def test_decorator_without_parentheses_defaults_to_cpu(plan_calls: list[str]) -> None:
    @tiermap.jit
    def f(x: jax.Array, w: jax.Array) -> jax.Array:
        return mlp(x, w)

    np.testing.assert_allclose(f(X, W), jax.jit(mlp)(X, W), rtol=1e-6)
    assert f.target.name == "cpu"
    assert f.__name__ == "f" and f.__wrapped__ is not None
    assert plan_calls == ["f"]


def test_decorator_with_options(plan_calls: list[str]) -> None:
    @tiermap.jit(target="sn40l", strategy="greedy", **FAST)
    def f(x: jax.Array, w: jax.Array) -> jax.Array:
        return mlp(x, w)

    np.testing.assert_allclose(f(X, W), mlp(X, W), rtol=1e-6)
    p = f.lower(X, W).plan()
    assert p.target.name == "sn40l" and p.strategy == "greedy"


def test_call_form_with_a_function() -> None:
    f = tiermap.jit(mlp, target="h100", **FAST)
    np.testing.assert_allclose(f(X, W), jax.jit(mlp)(X, W), rtol=1e-6)


def test_second_call_with_the_same_shapes_does_not_plan_again(plan_calls: list[str]) -> None:
    f = tiermap.jit(mlp, **FAST)
    f(X, W)
    f(X + 1, W * 2)                      # same shapes and dtypes: cached
    assert len(plan_calls) == 1
    assert f.cache_info() == (1, 1, 1)
    f(X[:16], W)                         # a new shape plans again
    f(X.astype(jnp.bfloat16), W.astype(jnp.bfloat16))   # so does a new dtype
    assert len(plan_calls) == 3
    assert f.cache_info().currsize == 3
    f.clear_cache()
    f(X, W)
    assert len(plan_calls) == 4


def test_pytrees_in_and_out() -> None:
    def step(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
        x, y = batch
        pred = x @ params["w"] + params["b"]
        return {"loss": jnp.mean((pred - y) ** 2), "pred": [pred]}

    params = {"w": W, "b": jnp.ones((8,), jnp.float32)}
    batch = (X, jnp.zeros((32, 8), jnp.float32))
    got = tiermap.jit(step, **FAST)(params, batch)
    want = jax.jit(step)(params, batch)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_keyword_arguments(plan_calls: list[str]) -> None:
    def scaled(x: jax.Array, *, scale: jax.Array) -> jax.Array:
        return x * scale

    f = tiermap.jit(scaled, **FAST)
    np.testing.assert_allclose(f(X, scale=jnp.float32(3.0)), X * 3.0)
    np.testing.assert_allclose(f(X, scale=jnp.float32(4.0)), X * 4.0)
    assert len(plan_calls) == 1      # a traced keyword argument is not part of the cache key


def test_static_argnums_and_argnames(plan_calls: list[str]) -> None:
    def power(x: jax.Array, n: int, mode: str = "plain") -> jax.Array:
        y = x
        for _ in range(n - 1):
            y = y * x
        return -y if mode == "neg" else y

    f = tiermap.jit(power, static_argnums=1, static_argnames="mode", **FAST)
    np.testing.assert_allclose(f(X, 3), X ** 3, rtol=1e-6)
    np.testing.assert_allclose(f(X, 3), X ** 3, rtol=1e-6)
    assert len(plan_calls) == 1
    np.testing.assert_allclose(f(X, 2, mode="neg"), -(X ** 2), rtol=1e-6)
    np.testing.assert_allclose(f(X, n=2, mode="neg"), -(X ** 2), rtol=1e-6)  # n by name
    assert len(plan_calls) == 3
    with pytest.raises(ValueError, match="not hashable"):
        f(X, [3])


def test_lower_gives_the_plan_and_the_compiled_program(plan_calls: list[str]) -> None:
    f = tiermap.jit(mlp, target="sn40l", **FAST)
    spec = (jax.ShapeDtypeStruct(X.shape, X.dtype), jax.ShapeDtypeStruct(W.shape, W.dtype))
    lowered = f.lower(*spec)
    p = lowered.plan()
    assert isinstance(p, tiermap.Plan)
    assert p.program_name == "mlp" and p.target.name == "sn40l"
    p.verify()
    compiled = lowered.compile()
    assert isinstance(compiled, jax.stages.Compiled)
    np.testing.assert_allclose(compiled(X, W), jax.jit(mlp)(X, W), rtol=1e-6)
    assert "tiermap." in lowered.as_text()
    f(X, W)                              # the call reuses the plan made by .lower
    assert len(plan_calls) == 1


def test_compiled_with_static_arguments_takes_the_dynamic_ones() -> None:
    f = tiermap.jit(lambda x, n: x * n, static_argnums=1, **FAST)
    compiled = f.lower(X, 5).compile()
    np.testing.assert_allclose(compiled(X), X * 5)


def test_grad_of_a_tiermap_function(plan_calls: list[str]) -> None:
    f = tiermap.jit(mlp, **FAST)

    def loss(w: jax.Array) -> jax.Array:
        return jnp.sum(f(X, w) ** 2)

    def reference(w: jax.Array) -> jax.Array:
        return jnp.sum(mlp(X, w) ** 2)

    np.testing.assert_allclose(jax.grad(loss)(W), jax.grad(reference)(W), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(W), jax.grad(reference)(W), rtol=1e-5,
                               atol=1e-6)
    assert len(plan_calls) == 1      # planned once, on the abstract shapes seen under grad


def test_vmap_around_a_tiermap_function(plan_calls: list[str]) -> None:
    f = tiermap.jit(mlp, **FAST)
    xs = jnp.stack([X, X * 2, X * 3])
    got = jax.vmap(f, in_axes=(0, None))(xs, W)
    np.testing.assert_allclose(got, jax.vmap(mlp, in_axes=(0, None))(xs, W), rtol=1e-6)
    assert len(plan_calls) == 1      # planned for one example, the per-example shapes


def test_outputs_and_grads_equal_jax_on_attention_with_the_planned_kernel() -> None:
    from tiermap.examples.models import attention

    fn, specs = attention(n=64, d=16, heads=2)
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, s.shape, s.dtype)
               for kk, s in zip(jax.random.split(key, 3), specs, strict=True))
    f = tiermap.jit(fn, target="h100", **FAST)
    np.testing.assert_allclose(f(q, k, v), jax.jit(fn)(q, k, v), rtol=2e-5, atol=2e-5)
    notes = " ".join(f.lower(q, k, v).notes)
    assert "attention 0" in notes and "blocked" in notes    # the planned kernel ran
    grad = jax.grad(lambda q: jnp.sum(f(q, k, v) ** 2))(q)   # through the kernel's custom_vjp
    want = jax.grad(lambda q: jnp.sum(fn(q, k, v) ** 2))(q)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4)


def test_bad_options_fail_early() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        tiermap.jit(mlp, targt="cpu")
    with pytest.raises(ValueError, match="strategy"):
        tiermap.jit(mlp, strategy="best")
    with pytest.raises(tiermap.HardwareSpecError, match="unknown target"):
        tiermap.jit(mlp, target="tpu-v9")
    with pytest.raises(ValueError, match="static_argnames"):
        tiermap.jit(mlp, static_argnames="nope")
