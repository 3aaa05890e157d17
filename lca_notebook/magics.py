"""The IPython extension: ``%load_ext lca_notebook``.

Loading it puts the package in the user's namespace as ``lca`` (so ``lca.analyze(...)`` runs with no
import), makes an ``LCAResult`` that ends a cell display as the explorer, and adds the cell magic::

    %%lca_record MODEL OPTIMIZER [--every N] [--to PATH [--overwrite]] [--name VAR] [--live --data DATA [--store PATH]]

which runs the cell (a training loop) inside ``lca.record(MODEL, OPTIMIZER, path=PATH, every=N)`` and
binds the recorder to ``VAR`` (default ``trajectory``) before the first line runs, so an interrupted
loop keeps what it recorded. ``%unload_ext lca_notebook`` undoes all three.

With ``--live`` the LCA is computed while the cell trains: ``lca.analyze(MODEL, DATA, PATH, store=STORE,
follow=True)`` runs in a background thread (on a copy of the model), and an explorer shown above the
cell's output grows with it, under a line saying how far the LCA lags behind training. Each iteration
costs at least two full-data gradients (Simpson), so on a big data set the LCA falls behind: snapshot
less often (``--every N``) or give a smaller ``DATA``. The result is bound to ``VAR_lca`` (default
``trajectory_lca``) when the LCA is done; it keeps going after the cell ends, until it has caught up. In a
notebook::

    %load_ext lca_notebook

    %%lca_record model opt --every 1
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    lca.analyze(model, data, trajectory)      # ends the cell: shows the explorer

    %%lca_record model opt --live --data data --every 5
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
"""

from __future__ import annotations

import contextlib
import copy
import html
import os
import tempfile
import threading
import time
from typing import Any

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

_NAMESPACE_NAME = "lca"


def _unquoted(value: str | None) -> str | None:
    """``value`` without one pair of quotes around it: ``"(x, y)"`` is the expression ``(x, y)``.

    >>> _unquoted('"(x, y)"'), _unquoted("'/tmp/a b.zarr'"), _unquoted("data")
    ('(x, y)', '/tmp/a b.zarr', 'data')
    """
    if value is not None and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


@magics_class
class LCAMagics(Magics):
    @magic_arguments()
    @argument("model", help="the nn.Module being trained (a name or expression in the notebook)")
    @argument("optimizer", help="its torch.optim optimizer")
    @argument("--every", type=int, default=1, help="snapshot after every N-th optimizer step (default 1)")
    @argument("--to", default=None, help="stream snapshots to a zarr store at this path instead of memory")
    @argument("--overwrite", action="store_true", help="with --to: replace a trajectory recorded there before")
    @argument("--name", default="trajectory", help="variable that receives the recorder (default: trajectory)")
    @argument("--live", action="store_true", help="compute the LCA while the cell trains, shown in an explorer")
    @argument("--data", default=None, help="with --live: the data the LCA's loss is taken over (name or expression)")
    @argument("--store", default=None, help="with --live: the result store (default: beside the trajectory)")
    @argument("--refresh", type=float, default=1.0, help="with --live: seconds between explorer updates")
    @cell_magic
    def lca_record(self, line, cell):
        """Record the trajectory of the training loop in this cell: ``%%lca_record model opt --every 1``."""
        import lca_notebook

        args = parse_argstring(self.lca_record, line)
        for key in ("model", "optimizer", "to", "name", "data", "store"):  # IPython keeps the quotes of "(x, y)"
            setattr(args, key, _unquoted(getattr(args, key)))
        if not args.refresh > 0:
            raise ValueError(f"--refresh must be a number of seconds > 0, got {args.refresh!r}")
        if not args.name.isidentifier():
            raise ValueError(f"--name {args.name!r} is not a Python variable name; use e.g. --name trajectory")
        shell = self.shell
        assert shell is not None  # a cell magic always runs in a shell
        if args.live and args.data is None:
            raise ValueError(
                "%%lca_record --live needs --data DATA: the LCA is the change of the loss over that data "
                '(e.g. --data "(x_train, y_train)", or a smaller held-out set to keep up with training)'
            )
        values = {}
        exprs = [("model", args.model), ("optimizer", args.optimizer)] + ([("data", args.data)] if args.live else [])
        for role, expr in exprs:
            try:
                values[role] = shell.ev(expr)
            except NameError as exc:
                raise NameError(
                    f"%%lca_record: the {role} {expr!r} is not defined in this notebook ({exc}); "
                    f"create it in an earlier cell"
                ) from None
        code = shell.transform_cell(cell)
        filename = shell.compile.cache(code)  # tracebacks show the cell's lines
        compiled = shell.compile(code, filename, "exec")
        path = args.to
        if args.live and path is None:
            path = os.path.join(tempfile.mkdtemp(prefix="lca-live-"), "trajectory.zarr")
        try:
            recording = lca_notebook.record(
                values["model"], values["optimizer"], path=path, every=args.every, overwrite=args.overwrite
            )
        except ValueError as exc:  # a trajectory already there: the magic's option, not record's keyword
            raise ValueError(f"%%lca_record: {exc}".replace("pass overwrite=True", "add --overwrite")) from None
        with recording as recorder:
            shell.user_ns[args.name] = recorder
            if args.live:
                store = args.store or os.path.join(os.path.dirname(os.path.abspath(path)), "lca.zarr")
                live = LiveLCA(values["model"], values["data"], path, store, refresh=args.refresh)
                live.on_done = lambda result: shell.user_ns.__setitem__(f"{args.name}_lca", result)
                from IPython.display import display

                display(live.panel)
                live.start()
                shell.user_ns[f"{args.name}_live"] = live
            exec(compiled, shell.user_ns)


class LiveLCA:
    """The LCA of a recording computed while it trains (``%%lca_record ... --live``): ``analyze(...,
    follow=True)`` in a background thread, and a panel (``panel``) with a status line and, from the first
    stored iteration on, an explorer that follows the store (``explorer``). ``lag()`` says how many
    snapshots the LCA is behind the recorder; ``join()`` waits for the end and returns the result (or raises
    the analysis's error)."""

    def __init__(self, model, data, trajectory_path, store, *, refresh: float = 1.0, **analyze_options):
        import ipywidgets as widgets

        self.model = copy.deepcopy(model)  # the LCA evaluates it at every snapshot; training uses the original
        self.data, self.path, self.store = data, os.path.abspath(trajectory_path), os.path.abspath(store)
        if not float(refresh) > 0:
            raise ValueError(f"refresh must be a number of seconds > 0, got {refresh!r}")
        self.refresh, self.options = float(refresh), analyze_options
        self.status = widgets.HTML("LCA: waiting for the first snapshots")
        self.status.add_class("lca-live-status")
        self.panel = widgets.VBox([self.status])
        self.explorer: Any = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.on_done: Any = None
        self._threads: list[threading.Thread] = []

    def start(self) -> LiveLCA:
        for target, name in ((self._analyze, "lca-live-analyze"), (self._watch, "lca-live-view")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _analyze(self):
        import lca_notebook

        try:
            self.result = lca_notebook.analyze(
                self.model, self.data, self.path, store=self.store, follow=True, progress=False, **self.options
            )
            if self.on_done is not None:
                self.on_done(self.result)
        except BaseException as exc:  # shown in the panel; join() raises it
            self.error = exc

    def counts(self) -> tuple[int, int]:
        """(snapshots recorded, iterations whose LCA is stored), read from the two stores' attributes."""
        from .storage.files import read_attrs

        def attr(path, name):
            try:
                value = read_attrs(path).get(name, 0)
            except (OSError, ValueError):
                return 0
            return value if isinstance(value, int) else 0

        return attr(self.path, "n_snapshots"), attr(self.store, "completed_iterations")

    def lag(self) -> int:
        """How many iterations the recorder is ahead of the stored LCA."""
        snapshots, done = self.counts()
        return max(0, snapshots - 1 - done)

    def _status_text(self) -> str:
        snapshots, done = self.counts()
        if self.error is not None:
            return f"<b>LCA stopped</b>: {html.escape(f'{type(self.error).__name__}: {self.error}')}"
        if self.result is not None:
            return f"LCA done: {self.result.n_iterations} iterations, in {html.escape(self.store)}"
        behind = max(0, snapshots - 1 - done)
        return (
            f"LCA: {done} of {max(0, snapshots - 1)} recorded iterations computed "
            f"(<b>{behind}</b> behind training; each costs at least 2 full-data gradients: --every N or "
            "a smaller --data keeps up)"
        )

    def _watch(self):
        from .widgets import explore

        while True:
            finished = self.result is not None or self.error is not None
            if self.explorer is None and self.counts()[1] >= 1:
                try:
                    self.explorer = explore(self.store, follow=True, interval=self.refresh)
                    self.panel.children = [self.status, self.explorer]
                except Exception:  # the store mid-growth: try at the next look
                    self.explorer = None
            self.status.value = self._status_text()
            if finished:
                if self.explorer is not None:
                    self.explorer.stop_following()
                    self.explorer.refresh()
                return
            time.sleep(self.refresh)

    def join(self, timeout: float | None = None):
        """Wait until the LCA is done (and the panel shows it); its result, or its error raised."""
        for thread in self._threads:
            thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def _display_result(result, include=None, exclude=None):
    """Mimebundle formatter: an LCAResult ending a cell shows as the explorer (text repr alongside)."""
    from .widgets import explore

    bundle = explore(result)._repr_mimebundle_(include=include, exclude=exclude)
    if isinstance(bundle, tuple):
        bundle = bundle[0]
    bundle["text/plain"] = repr(result)
    return bundle


def load_ipython_extension(ipython):
    """Called by ``%load_ext lca_notebook``; loading twice changes nothing."""
    import lca_notebook

    from .result import LCAResult

    ipython.push({_NAMESPACE_NAME: lca_notebook})
    ipython.register_magics(LCAMagics)
    ipython.display_formatter.mimebundle_formatter.for_type(LCAResult, _display_result)


def unload_ipython_extension(ipython):
    """Called by ``%unload_ext lca_notebook``: removes ``lca``, the magic and the explorer display."""
    import lca_notebook

    from .result import LCAResult

    if ipython.user_ns.get(_NAMESPACE_NAME) is lca_notebook:
        ipython.drop_by_id({_NAMESPACE_NAME: lca_notebook})
    ipython.magics_manager.magics["cell"].pop("lca_record", None)
    ipython.magics_manager.registry.pop("LCAMagics", None)
    formatter = ipython.display_formatter.mimebundle_formatter
    with contextlib.suppress(KeyError):
        formatter.pop(LCAResult)
