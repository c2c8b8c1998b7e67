"""Compiled SVI steps: one step of a Pyro program (its loss and gradients) recorded once as a
static graph and replayed while the shapes stay the same, as NumPyro's ``jit`` does.

``torch.fx``'s ``make_fx`` runs the ELBO's ``differentiable_loss`` and ``torch.autograd.grad`` under
its tracer with the param store's tensors, the minibatch and its row indices as the graph's inputs:
the graph holds only the aten ops of the forward and backward pass (random draws included, in
order), none of Pyro's messengers, traces or autograd bookkeeping. Correct or not at all: a graph is
used only after it reproduced the eager Pyro loss and gradients on its first batch, from the same
RNG state; a program that cannot be recorded (a tensor read as a Python number: data-dependent
control flow) or that disagrees runs eagerly, said in one line.
"""
import contextlib
import copy
import functools
import importlib
import sys
import time
import traceback
import warnings

import pyro
import pyro.infer.util
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger, _bound_partial, _context_wrap

from ppl_lvm import program

MODES = (True, False, "auto", "inductor")
# fit's compile="auto": compile runs of at least this many steps. Measured on a 784-400-20 VAE,
# batch 128, one CPU thread: the graph saves ~1.2 ms of a ~11 ms step, recording and checking it
# costs ~1.5 s (plus ~3 s for make_fx's first use in a process)
AUTO_MIN_STEPS = 4000
# log_marginal(compile="auto"): compile at K ≥ this many samples per datapoint
AUTO_MIN_SAMPLES = 100
# graphs kept per loss: the full minibatch and the last, partial one of an epoch
MAX_GRAPHS = 2
# Pyro's ELBOs turn tensors into floats (torch_item) and test them for NaN (warn_if_nan): both read
# a tensor as a Python number, which a recorded graph cannot do; while recording they keep the
# tensor (detached) and skip the test (fit's divergence guard checks every step's loss instead)
_ELBO_MODULES = ("pyro.infer.trace_elbo", "pyro.infer.traceenum_elbo", "pyro.infer.tracegraph_elbo",
                 "pyro.infer.trace_mean_field_elbo", "pyro.infer.renyi_elbo")


def _keep_tensor(value):
    return value.detach() if torch.is_tensor(value) else value


def _no_check(*args, **kwargs):
    return None


class _NoStacks:
    """``traceback`` for torch's fake-tensor module while recording: ``extract_stack`` returns no
    frames. make_fx builds a ``FakeTensorMode`` for each recorded op's metadata, and each one
    keeps the whole Python stack for its error messages: 177 stacks, about half of a VAE step's
    recording (0.22 of 0.41 s)."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    @staticmethod
    def extract_stack(*args, **kwargs):
        return traceback.StackSummary()


@contextlib.contextmanager
def _tracing():
    """make_fx without a Python stack trace per recorded op (it cost ~1 s of a ~1.5 s recording),
    nor one per fake-tensor mode that it creates (``_NoStacks``)."""
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.fx.config as fx_config

    saved = fx_config.do_not_emit_stack_traces, fake_tensor.traceback
    fx_config.do_not_emit_stack_traces = True
    fake_tensor.traceback = _NoStacks(saved[1])
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces, fake_tensor.traceback = saved


def _rng_state():
    """The generators' states that a recorded step draws from: the CPU's and, where CUDA is in
    use, every CUDA device's (a graph on a GPU draws from its generator: its check against eager
    must start both from the same state)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


_RECORDING = program.RECORDING  # the flag lives in the leaf, for the density kernel to read
is_recording = program.is_recording


@contextlib.contextmanager
def recordable():
    """Pyro's ELBOs with ``torch_item`` keeping tensors and ``warn_if_nan`` off (while recording)."""
    saved = []
    _RECORDING[0] = True
    for module_name in _ELBO_MODULES:
        module = importlib.import_module(module_name)
        for name, stand_in in (("torch_item", _keep_tensor), ("warn_if_nan", _no_check)):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, stand_in)
    try:
        yield
    finally:
        _RECORDING[0] = False
        for module, name, value in saved:
            setattr(module, name, value)


class NotCompilable(Exception):
    """Why a program's step cannot be recorded as a graph (said in the one-line fallback)."""


def _unwrap(fn):
    # a handler applied to a function is _bound_partial(partial(_context_wrap, handler, fn))
    while isinstance(fn, _bound_partial) and isinstance(fn.func, functools.partial):
        fn = fn.func
    return fn


def _unbind(fn):
    """(key, tensors): what identifies ``fn`` from one minibatch to the next, and the tensors it
    carries (``program.bind``'s row indices [B]) that become graph inputs."""
    fn = _unwrap(fn)
    if isinstance(fn, functools.partial) and fn.func is program._call_with_rows:
        inner, idx, num_data = fn.args
        return ("rows", inner, int(num_data)), (idx,)
    if isinstance(fn, functools.partial) and fn.func is _context_wrap and isinstance(
            fn.args[0], program.ScaleDataPlate):
        messenger, inner = fn.args[0], fn.args[1]
        inner_key, tensors = _unbind(inner)
        return ("scaled", float(messenger.scale), messenger.plate_name, messenger.batch_size,
                inner_key), tensors
    if isinstance(fn, functools.partial) or isinstance(getattr(fn, "__self__", None), Messenger):
        # a wrapper made afresh per step that we cannot see into: its identity says nothing
        raise NotCompilable(f"the callable {fn!r} is a wrapper this module cannot key")
    return fn, ()


def _signature(value):
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in sorted(value.items())))
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    return ("object", id(value))


def _store_tensors(names):
    """The param store's unconstrained leaf tensors for ``names`` (the objects Adam updates)."""
    store = pyro.get_param_store()
    return [store._params[name] for name in names]


def _close(expected, actual, rtol, atol):
    """Equal to float tolerance: ``atol`` relative to the largest |entry| (a fused kernel sums in
    another order; entries that nearly cancel keep only an absolute precision)."""
    if expected is None or actual is None:
        return (expected is None or not expected.abs().sum()) and (
            actual is None or not actual.to_dense().abs().sum())
    expected, actual = expected.to_dense(), actual.to_dense()
    scale = 1.0 + (float(expected.abs().max()) if expected.numel() else 0.0)
    return expected.shape == actual.shape and torch.allclose(actual, expected, rtol=rtol,
                                                             atol=atol * scale)


class _Graph:
    """One recorded step: ``run(params, inputs) -> (loss, grads)`` for inputs of one signature."""

    def __init__(self, elbo, model, guide, args, kwargs, names, backend):
        store = pyro.get_param_store()
        self.names = names
        model_key, model_tensors = _unbind(model)
        guide_key, guide_tensors = _unbind(guide)
        self.num_model_tensors = len(model_tensors)
        rebind_model, rebind_guide = _rebinder(model), _rebinder(guide)

        def step(params, tensors, args):
            model_fn = rebind_model(tensors[:self.num_model_tensors])
            guide_fn = rebind_guide(tensors[self.num_model_tensors:])
            with recordable():
                loss = elbo.differentiable_loss(model_fn, guide_fn, *args, **kwargs)
            if not torch.is_tensor(loss) or not loss.requires_grad:
                raise NotCompilable("the loss does not depend on the parameters")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return loss.detach(), grads

        from torch.fx.experimental.proxy_tensor import make_fx

        params = [store._params[name] for name in names]
        try:
            with pyro.validation_enabled(False), _tracing():
                self.module = make_fx(step)(params, list(model_tensors) + list(guide_tensors),
                                            list(args))
        except NotCompilable:
            raise
        except Exception as error:  # noqa: BLE001 (any failure to record means: run eagerly)
            raise NotCompilable(_why(error))
        self.function = self.module
        self.inductor = backend == "inductor"
        if self.inductor:
            self.function = torch.compile(self.module, dynamic=False)

    def __call__(self, params, tensors, args):
        with torch.no_grad(), _same_draws(self.inductor):
            return self.function(params, tensors, args)


@contextlib.contextmanager
def _same_draws(inductor):
    """Under torch.compile, random ops keep drawing from torch's generator as eager ones do
    (inductor's own fused RNG would draw other numbers: same law, not the same values)."""
    if not inductor:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


def _why(error):
    """One line on why recording failed, naming the user's line where it did."""
    where = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename != __file__ and not any(
                part in frame.filename for part in ("/torch/", "/pyro/", "/contextlib.py")):
            where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} ({frame.line})"
            break
    text = str(error)
    if "_local_scalar_dense" in text or "data-dependent" in text:
        return ("data-dependent control flow: the program reads a tensor as a Python number "
                f"(.item(), int(), bool(), `if tensor:`){where}")
    first = (text.strip().splitlines() or [""])[0][:160]
    return f"recording failed ({type(error).__name__}: {first}){where}"


def _rebinder(fn):
    """A function of fresh carried tensors that rebuilds ``fn`` as ``program.bind`` made it."""
    fn = _unwrap(fn)
    if isinstance(fn, functools.partial) and fn.func is program._call_with_rows:
        inner, _, num_data = fn.args
        return lambda tensors: functools.partial(program._call_with_rows, inner, tensors[0],
                                                 num_data)
    if isinstance(fn, functools.partial) and fn.func is _context_wrap:
        messenger, inner = fn.args[0], fn.args[1]
        rebuild = _rebinder(inner)
        return lambda tensors: program.ScaleDataPlate(
            messenger.scale, messenger.plate_name, messenger.batch_size)(rebuild(tensors))
    return lambda tensors: fn


class CompiledELBO:
    """A Pyro ELBO whose ``loss_and_grads`` replays a recorded graph of the step (see module doc).

    Wraps ``elbo`` (``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceEnum_ELBO``, ``IWAE_ELBO``, ...);
    everything else (``loss``, ``differentiable_loss``, ``num_particles``) is the wrapped ELBO's.
    backend: "fx" runs the recorded graph as Python over aten ops; "inductor" also passes it to
    ``torch.compile`` (fused kernels; compiling takes tens of seconds on a CPU).
    While Pyro's validation is on, steps run eagerly (its checks read tensors as Python numbers).

    Guarantee: a graph is used only after it reproduced eager Pyro's loss and every gradient on
    its first batch from the same RNG state (to ``rtol``/``atol``); it consumes torch's RNG as
    eager Pyro does (the same draws in the same order, "inductor" too), so a seeded run gives the
    same numbers as eager up to float rounding (the loss is summed in float32 inside the graph,
    in Python floats by Pyro; "inductor" also fuses kernels and sums in another order).
    """

    def __init__(self, elbo, backend="fx", rtol=1e-4, atol=1e-5, max_graphs=MAX_GRAPHS):
        if backend not in ("fx", "inductor"):
            raise ValueError(f"backend must be 'fx' or 'inductor', got {backend!r}")
        self.elbo, self.backend, self.rtol, self.atol = elbo, backend, rtol, atol
        self.max_graphs = max_graphs
        self.graphs = {}        # signature -> _Graph, or the reason it runs eagerly (a str)
        self.compile_time = 0.0
        self.reasons = []       # each fallback's one line, in order
        self.steps = {"graph": 0, "eager": 0}

    def __getattr__(self, name):
        if name == "elbo":
            raise AttributeError(name)
        return getattr(self.elbo, name)

    def loss(self, model, guide, *args, **kwargs):
        return self.elbo.loss(model, guide, *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)

    def summary(self):
        """One line: graphs recorded, compile time, steps on each path, fallback reasons."""
        graphs = sum(isinstance(g, _Graph) for g in self.graphs.values())
        line = (f"compiled ({self.backend}): {graphs} graph(s) in {self.compile_time:.1f} s; "
                f"{self.steps['graph']} steps on the graph, {self.steps['eager']} eager")
        return line + "".join(f"; {reason}" for reason in self.reasons)

    def _fallback(self, signature, reason):
        self.graphs[signature] = reason
        line = f"compile: running eagerly: {reason}"
        self.reasons.append(reason)
        warnings.warn(line, stacklevel=4)

    def _eager(self, model, guide, args, kwargs):
        self.steps["eager"] += 1
        return self.elbo.loss_and_grads(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if pyro.infer.util.is_validation_enabled() or not torch.is_grad_enabled():
            return self._eager(model, guide, args, kwargs)
        try:
            model_key, model_tensors = _unbind(model)
            guide_key, guide_tensors = _unbind(guide)
        except NotCompilable as error:
            if "unkeyed" not in self.graphs:
                self._fallback("unkeyed", str(error))
            return self._eager(model, guide, args, kwargs)
        if isinstance(self.graphs.get((model_key, guide_key)), str):
            return self._eager(model, guide, args, kwargs)  # this program cannot be recorded
        tensors = list(model_tensors) + list(guide_tensors)
        signature = (model_key, guide_key, _signature(tensors), _signature(list(args)),
                     _signature(kwargs))
        graph = self.graphs.get(signature)
        if graph is None:
            if sum(isinstance(g, _Graph) for g in self.graphs.values()) >= self.max_graphs:
                self._fallback(signature, f"more than {self.max_graphs} shapes or programs "
                                          "(e.g. a model wrapped afresh each step)")
                return self._eager(model, guide, args, kwargs)
            return self._record(signature, (model_key, guide_key), model, guide, args, kwargs)
        if isinstance(graph, str):
            return self._eager(model, guide, args, kwargs)
        params = _store_tensors(graph.names)
        loss, grads = graph(params, tensors, list(args))
        for param, grad in zip(params, grads):
            param.grad = grad
        # the param sites that an enclosing poutine.trace(param_only=True) (svi_step) collects
        for name in graph.names:
            pyro.param(name)
        self.steps["graph"] += 1
        return loss.item()

    def _record(self, signature, program_key, model, guide, args, kwargs):
        """Take this step eagerly, record its graph, check that the graph reproduces it."""
        rng = _rng_state()
        with poutine.trace(param_only=True) as captured:
            value = self._eager(model, guide, args, kwargs)
        names = list(captured.trace.nodes)
        params = _store_tensors(names)
        expected = [None if p.grad is None else p.grad.clone() for p in params]
        after = _rng_state()
        start = time.perf_counter()
        try:
            _set_rng_state(rng)
            graph = _Graph(self.elbo, model, guide, args, kwargs, names, self.backend)
            _set_rng_state(rng)
            loss, grads = graph(params, list(_unbind(model)[1]) + list(_unbind(guide)[1]),
                                list(args))
            value_ok = abs(float(loss) - float(value)) <= self.rtol * abs(float(value)) + self.atol
            bad = [name for name, e, g in zip(names, expected, grads)
                   if not _close(e, g, self.rtol, self.atol)]
            if not value_ok or bad:
                raise NotCompilable("the recorded graph disagrees with eager Pyro on the first "
                                    f"batch (loss {float(value):.6g} vs {float(loss):.6g}"
                                    + (f"; gradients of {bad[:3]}" if bad else "") + ")")
        except NotCompilable as error:
            self._fallback(signature, str(error))
            self.graphs[program_key] = str(error)  # the next shape would fail alike
            return value
        finally:
            _set_rng_state(after)
            self.compile_time += time.perf_counter() - start
        self.graphs[signature] = graph
        return value


def compile_loss(loss, compile=True, total_steps=None):
    """``loss`` as fit steps it under ``compile`` (True, "auto", "inductor" or False): a
    ``CompiledELBO`` or ``loss`` itself. "auto" compiles runs of at least ``AUTO_MIN_STEPS``
    steps (``total_steps``): recording and checking a graph costs a few hundred steps' savings.
    A loss that a graph cannot follow is refused in one warning line and runs as it is."""
    if compile not in MODES and compile is not None:
        raise ValueError(f"compile must be one of {MODES}, got {compile!r}")
    if not compile or (compile == "auto" and (total_steps or 0) < AUTO_MIN_STEPS):
        return loss
    if isinstance(loss, CompiledELBO):
        return loss
    if type(loss).__name__.startswith("Jit"):
        warnings.warn(f"compile: {type(loss).__name__} is already traced by torch.jit; running it "
                      "as it is", stacklevel=3)
        return loss
    if not hasattr(loss, "differentiable_loss"):
        warnings.warn(f"compile: {type(loss).__name__} has no differentiable_loss to record; "
                      "running it eagerly", stacklevel=3)
        return loss
    return CompiledELBO(loss, backend="inductor" if compile == "inductor" else "fx")


# ----------------------------------------------------------------------------------------------
# estimators: the log weights of one chunk of rows, log w [K, n], as a recorded graph


# log-weight graphs kept for later calls (the recording, and inductor's compiling, are paid once
# per program and chunk shape in a process); each call checks one against eager on its first chunk
_SHARED_GRAPHS = {}
_SHARED_SIZE = 8


class CompiledWeights:
    """An estimator's program (``ppl_lvm.estimators``' ``_Program``) whose ``log_weights(rows, K)``
    replays a graph recorded per chunk shape: the guide's draws, the model replayed on them and
    the per-datapoint sums, with the chunk's rows (x, the model's further per-row arguments,
    the guide's ``idx``) and the param store's tensors as inputs.

    The first chunk of each shape runs eagerly and the graph is checked against it from the same
    RNG state; the observed values' support check is recorded too (a chunk that fails it runs
    eagerly, which raises the usual error). Everything else is the wrapped program's.

    Graphs outlive the call: a later call on the same program and shapes takes the graph an
    earlier call recorded, after checking it against eager on its own first chunk of that shape
    (the same check as a fresh recording; a program that changed in a way no key can see, such as
    a tensor or flag it closes over, fails it and is recorded afresh). Only the recording is
    saved, not the eager first chunk.

    backend: "fx" replays the graph as Python over aten ops; "inductor" also passes it to
    ``torch.compile`` (fused kernels; random draws still from torch's generator, so a seeded
    answer is eager's up to float rounding), checked against eager a second time. Measured on a
    784-400-20 VAE, one CPU thread, a chunk of 20 rows × 100 particles: fx 1.04×, inductor 0.91×
    a hand-written eager IWAE, after 3-7 s of compiling per chunk shape and process.
    """

    def __init__(self, prog, max_graphs=4, rtol=1e-5, atol=1e-4, backend="fx"):
        if backend not in ("fx", "inductor"):
            raise ValueError(f"backend must be 'fx' or 'inductor', got {backend!r}")
        self.prog, self.max_graphs, self.rtol, self.atol = prog, max_graphs, rtol, atol
        self.inductor = backend == "inductor"
        self.graphs = {}
        self.reason = None
        self.compile_time = 0.0
        self.recorded = 0
        self.steps = {"graph": 0, "eager": 0}

    def __getattr__(self, name):
        if name == "prog":
            raise AttributeError(name)
        return getattr(self.prog, name)

    def summary(self):
        """One line: graphs recorded (and the time it took), taken from an earlier call, chunks
        on a graph and eager, or why the call ran eagerly."""
        backend = "inductor" if self.inductor else "fx"
        if self.reason is not None:
            return f"compiled log weights ({backend}): ran eagerly: {self.reason}"
        return (f"compiled log weights ({backend}): {self.recorded} graph(s) recorded in "
                f"{self.compile_time:.1f} s, {self.steps.get('checked', 0)} taken from an "
                f"earlier call (checked on this call's first chunk); {self.steps['graph']} "
                f"chunk(s) on a graph, {self.steps['eager']} eager")

    def _chunk(self, rows):
        prog = self.prog
        args, kwargs = program.take((prog.x,) + tuple(prog.rest), prog.model_kwargs, rows,
                                    prog.num_rows)
        idx = prog.idx[rows] if torch.is_tensor(prog.idx) else prog.idx
        return args, kwargs, idx

    def _view(self, args, kwargs, idx):
        """The program bound to one chunk's rows as if they were all of x."""
        view = copy.copy(self.prog)
        view.x, view.rest, view.model_kwargs, view.idx = args[0], tuple(args[1:]), kwargs, idx
        view.num_rows = args[0].shape[0]
        return view

    def _eager(self, rows, num_particles):
        self.steps["eager"] += 1
        return self.prog.log_weights(rows, num_particles)

    def log_weights(self, rows, num_particles):
        if self.reason is None and not getattr(self.prog, "vectorized", False):
            self.reason = ("the model/guide could not be vectorised over particles: its loop "
                           "over particles runs eagerly")
            warnings.warn(f"compile: log weights run eagerly: {self.reason}", stacklevel=4)
        if self.reason is not None:
            return self._eager(rows, num_particles)
        args, kwargs, idx = self._chunk(rows)
        tensors, rebuild = _flatten((args, kwargs, idx))
        key = (_signature(tensors), num_particles)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(rows, num_particles)
            shared = self._shared_key(key)
            graph = _SHARED_GRAPHS.get(shared) if shared is not None else None
            if graph is not None:
                checked = self._check(graph, rows, num_particles, tensors)
                if checked is not None:
                    self.graphs[key] = graph
                    return checked
            return self._record(key, rows, num_particles, tensors, rebuild)
        store = pyro.get_param_store()
        params = [store._params[name] for name in graph.names]
        with torch.no_grad(), _same_draws(self.inductor):
            log_weights, inside = graph.module(params, tensors)
        if not bool(inside):  # an observed value outside its support: eager says which
            return self._eager(rows, num_particles)
        self.steps["graph"] += 1
        return log_weights

    def _shared_key(self, key):
        """The key of this chunk shape's graph among the calls of this process: the program
        (model, guide, method, shapes: ``estimators._probe_key``), the chunk's signature and K,
        the param store's names, shapes and dtypes, and the backend; None: not shared."""
        probe_key = getattr(self.prog, "probe_key", None)
        if probe_key is None:
            return None
        store = pyro.get_param_store()
        params = tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in store._params.items())
        return (probe_key, key, params, self.inductor)

    def _check(self, graph, rows, num_particles, tensors):
        """A graph recorded by an earlier call, on this call's first chunk of its shape: eager's
        log weights [K, n] when the graph gives the same from the same RNG state, else None with
        the RNG as it was (the program changed in a way the key cannot see: a tensor, flag or
        network it closes over; it is then recorded afresh)."""
        rng = _rng_state()
        expected = self._eager(rows, num_particles)
        after = _rng_state()
        try:
            same = self._replays(graph.module, graph.names, rng, tensors, expected, self.inductor)
        except Exception:  # noqa: BLE001 (a graph that no longer runs is recorded afresh)
            same = False
        if not same:  # back to rng: the recording's eager run draws this chunk's numbers again
            _set_rng_state(rng)
            return None
        _set_rng_state(after)
        self.steps["checked"] = self.steps.get("checked", 0) + 1
        return expected

    def _replays(self, function, names, rng, tensors, expected, inductor=False):
        """Whether the graph ``function`` gives eager's log weights ``expected`` [K, n] (and
        every observed value inside its support) when it draws from the RNG state ``rng``."""
        store = pyro.get_param_store()
        _set_rng_state(rng)
        with torch.no_grad(), _same_draws(inductor):
            actual, inside = function([store._params[n] for n in names], tensors)
        return bool(inside) and actual.shape == expected.shape and torch.allclose(
            actual, expected, rtol=self.rtol, atol=self.atol)

    def _record(self, key, rows, num_particles, tensors, rebuild):
        from torch.fx.experimental.proxy_tensor import make_fx

        rng = _rng_state()
        expected = self._eager(rows, num_particles)
        after = _rng_state()
        start = time.perf_counter()
        store = pyro.get_param_store()
        names = list(store.keys())
        module = sys.modules[type(self.prog).__module__]

        def chunk_weights(params, tensors):
            checks = []
            view = self._view(*rebuild(tensors))
            saved = module.check_observed_support
            module.check_observed_support = functools.partial(_support_flags, checks)
            try:
                with recordable():
                    log_weights = view.log_weights(slice(0, view.num_rows), num_particles)
            finally:
                module.check_observed_support = saved
            inside = torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool)
            return log_weights, inside

        try:
            _set_rng_state(rng)
            try:
                with _tracing():
                    recorded = make_fx(chunk_weights)([store._params[n] for n in names], tensors)
            except Exception as error:  # noqa: BLE001 (any failure to record means: run eagerly)
                raise NotCompilable(_why(error))
            if not self._replays(recorded, names, rng, tensors, expected):
                raise NotCompilable("the recorded log weights disagree with eager Pyro on the "
                                    "first chunk")
            if self.inductor:
                recorded = self._inductor(recorded, rng, names, tensors, expected)
        except NotCompilable as error:
            self.reason = str(error)
            warnings.warn(f"compile: log weights run eagerly: {error}", stacklevel=4)
            return expected
        finally:
            _set_rng_state(after)
            self.compile_time += time.perf_counter() - start
        self.graphs[key] = _Recorded(recorded, names)
        self.recorded += 1
        shared = self._shared_key(key)
        if shared is not None:
            _SHARED_GRAPHS.pop(shared, None)
            if len(_SHARED_GRAPHS) >= _SHARED_SIZE:
                _SHARED_GRAPHS.pop(next(iter(_SHARED_GRAPHS)))
            _SHARED_GRAPHS[shared] = self.graphs[key]
        return expected

    def _inductor(self, recorded, rng, names, tensors, expected):
        """The recorded graph through ``torch.compile``, checked against eager from ``rng``."""
        # its forward, not the module: torch.compile of a module warns under the global forward
        # pre-hook of program.evaluation_mode (the graph calls no module)
        function = torch.compile(recorded.forward, dynamic=False)
        try:
            same = self._replays(function, names, rng, tensors, expected, inductor=True)
        except Exception as error:  # noqa: BLE001 (a failed compile means: run eagerly)
            raise NotCompilable(f"torch.compile failed ({type(error).__name__}: "
                                f"{(str(error).strip().splitlines() or [''])[0][:160]})")
        if not same:
            raise NotCompilable("the inductor-compiled log weights disagree with eager Pyro on "
                                "the first chunk")
        return function


class _Recorded:
    def __init__(self, module, names):
        self.module, self.names = module, names


def _support_flags(flags, trace, skip=()):
    """``check_observed_support`` while recording: each observed site's support check as a
    tensor flag (a graph output) instead of a raise."""
    for name, site in program.sample_sites(trace).items():
        if site["is_observed"] and name not in skip:
            try:
                inside = site["fn"].support.check(site["value"])
            except (RuntimeError, ValueError, NotImplementedError):
                raise NotCompilable(f"the support of observed site {name!r} cannot be checked "
                                    "on batched values")
            flags.append(inside.all())


def _flatten(value):
    """(tensors, rebuild): the tensors inside nested tuples/dicts, and a function that puts new
    tensors back in their places."""
    tensors = []

    def walk(v):
        if torch.is_tensor(v):
            tensors.append(v)
            return ("tensor", len(tensors) - 1)
        if isinstance(v, tuple):
            return ("tuple", [walk(item) for item in v])
        if isinstance(v, dict):
            return ("dict", [(k, walk(item)) for k, item in v.items()])
        return ("value", v)

    shape = walk(value)

    def build(node, new):
        kind, content = node
        if kind == "tensor":
            return new[content]
        if kind == "tuple":
            return tuple(build(item, new) for item in content)
        if kind == "dict":
            return {k: build(item, new) for k, item in content}
        return content

    return tensors, lambda new: build(shape, new)


def compile_weights(prog, compile=True, num_samples=None):
    """``prog`` (an estimator's program) with compiled log weights under ``compile`` (True,
    "inductor": the graph also through ``torch.compile``, or "auto": on a GPU for
    K = ``num_samples`` ≥ ``AUTO_MIN_SAMPLES``), else ``prog`` itself.

    On a CPU a chunk's arithmetic outweighs Pyro's per-chunk Python work, and each call runs its
    first chunk of each shape eagerly (and records it, the first time in a process), so "auto"
    leaves the CPU eager (measured: no gain at K ≤ 1000 for the fx graph).
    """
    if compile not in MODES and compile is not None:
        raise ValueError(f"compile must be one of {MODES}, got {compile!r}")
    if not compile or (compile == "auto" and (
            (num_samples or 0) < AUTO_MIN_SAMPLES or prog.x.device.type == "cpu")):
        return prog
    return CompiledWeights(prog, backend="inductor" if compile == "inductor" else "fx")


# ----------------------------------------------------------------------------------------------
# AIS: the annealed log-density and its gradient in the chains' unconstrained latents u

# ais_log_marginal(compile="auto"): compile when a call evaluates the density at least this many
# times (T × L per chunk of rows). Measured on a 784-400-20 VAE, one CPU thread: recording and
# checking a graph costs ~1 s (plus ~3 s for make_fx's first use in a process); a graph saves
# about half of each evaluation's time
AUTO_MIN_EVALUATIONS = 2000


class CompiledDensity:
    """AIS's ``evaluate(call, u, beta, split)`` (``ppl_lvm.ais``: log f_0 + log |dz/du| and
    log p(x, z) / f_0 [K, n] from the density kernel, and their gradients in u) replayed from a
    graph recorded per shape of its tensors (the chunk's x and per-row arguments, the u of each
    site) and per ``split``: the model and guide traces, the kernel's per-datapoint sums and the
    backward pass, with the param store's tensors and β as inputs.

    Correct or not at all: a graph is used only after it reproduced the eager evaluation (values
    and gradients, to ``rtol``/``atol``) on the call that recorded it; a program that cannot be
    recorded, or disagrees, runs eagerly after one warning line.
    """

    def __init__(self, evaluate, max_graphs=4, rtol=1e-4, atol=1e-5):
        self.evaluate, self.max_graphs, self.rtol, self.atol = evaluate, max_graphs, rtol, atol
        self.graphs = {}
        self.reason = None
        self.compile_time = 0.0
        self.steps = {"graph": 0, "eager": 0}

    def summary(self):
        """One line: graphs recorded, compile time, evaluations on each path, why eager."""
        line = (f"compiled density: {len(self.graphs)} graph(s) in {self.compile_time:.1f} s; "
                f"{self.steps['graph']} evaluations on the graph, {self.steps['eager']} eager")
        return line + (f"; {self.reason}" if self.reason else "")

    def _eager(self, call, u, beta, split):
        self.steps["eager"] += 1
        return self.evaluate(call, u, beta, split)

    def __call__(self, call, u, beta, split=False):
        if self.reason is not None:
            return self._eager(call, u, beta, split)
        names = list(u)
        tensors, rebuild = _flatten((call, tuple(u.values())))
        unique, positions = _unique(tensors)
        key = (_signature(unique), tuple(positions), tuple(names), split)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(call, u, beta, split)
            return self._record(key, call, u, beta, split, unique, positions, rebuild)
        store = pyro.get_param_store()
        params = [store._params[name] for name in graph.names]
        beta = [] if split else [torch.tensor(beta, dtype=torch.float64)]
        with torch.no_grad():
            outputs = graph.module(params, unique, beta)
        self.steps["graph"] += 1
        return _unpack(outputs, names, split)

    def _record(self, key, call, u, beta, split, unique, positions, rebuild):
        from torch.fx.experimental.proxy_tensor import make_fx

        expected = self._eager(call, u, beta, split)
        start = time.perf_counter()
        store = pyro.get_param_store()
        param_names = list(store.keys())
        names = list(u)

        def density(params, unique, beta):
            call_, values = rebuild([unique[p] for p in positions])
            with recordable():
                outputs = self.evaluate(call_, dict(zip(names, values)),
                                        None if split else beta[0], split)
            return _pack(outputs, split)

        beta_input = [] if split else [torch.tensor(beta, dtype=torch.float64)]
        try:
            try:
                with pyro.validation_enabled(False), _tracing():
                    recorded = make_fx(density)([store._params[n] for n in param_names], unique,
                                                beta_input)
            except Exception as error:  # noqa: BLE001 (any failure to record means: run eagerly)
                raise NotCompilable(_why(error))
            with torch.no_grad():
                actual = recorded([store._params[n] for n in param_names], unique, beta_input)
            bad = [i for i, (e, a) in enumerate(zip(_pack(expected, split), actual))
                   if not _close(e, a, self.rtol, self.atol)]
            if bad:
                raise NotCompilable("the recorded log-density disagrees with eager Pyro on its "
                                    f"first call (outputs {bad[:3]})")
        except NotCompilable as error:
            self.reason = str(error)
            warnings.warn(f"compile: AIS's log-density runs eagerly: {error}", stacklevel=4)
            return expected
        finally:
            self.compile_time += time.perf_counter() - start
        self.graphs[key] = _Recorded(recorded, param_names)
        return expected


def _unique(tensors):
    """(the distinct tensors, each input's position among them): a tensor passed twice (x in the
    model's and the guide's arguments) is one graph input."""
    unique, positions, seen = [], [], {}
    for tensor in tensors:
        if id(tensor) not in seen:
            seen[id(tensor)] = len(unique)
            unique.append(tensor)
        positions.append(seen[id(tensor)])
    return unique, positions


def _pack(outputs, split):
    """``evaluate``'s result as a flat list of tensors (a graph's outputs)."""
    if split:
        log_base, log_ratio, grads_base, grads_ratio = outputs
        return [log_base, log_ratio, *grads_base.values(), *grads_ratio.values()]
    log_base, log_ratio, grads = outputs
    return [log_base, log_ratio, *grads.values()]


def _unpack(outputs, names, split):
    log_base, log_ratio, rest = outputs[0], outputs[1], list(outputs[2:])
    if split:
        count = len(names)
        return (log_base, log_ratio, dict(zip(names, rest[:count])),
                dict(zip(names, rest[count:])))
    return log_base, log_ratio, dict(zip(names, rest))


def compile_density(evaluate, compile=False, num_evaluations=None):
    """AIS's ``evaluate`` under ``compile``: a ``CompiledDensity``, or None (evaluate eagerly).
    True or "inductor" (taken as True: torch.compile of this graph took ~35 s on a CPU, more than
    a typical AIS run saves) compile; "auto" compiles calls that evaluate the density at least
    ``AUTO_MIN_EVALUATIONS`` times per chunk of rows (``num_evaluations``)."""
    if compile not in MODES and compile is not None:
        raise ValueError(f"compile must be one of {MODES}, got {compile!r}")
    if not compile or (compile == "auto" and (num_evaluations or 0) < AUTO_MIN_EVALUATIONS):
        return None
    return CompiledDensity(evaluate)
