"""The IPython extension: ``%load_ext lca_notebook``.

Loading it puts the package in the user's namespace as ``lca`` (so ``lca.analyze(...)`` runs with no
import), makes an ``LCAResult`` that ends a cell display as the explorer, and adds the cell magic::

    %%lca_record MODEL OPTIMIZER [--every N] [--to PATH] [--name VAR]

which runs the cell (a training loop) inside ``lca.record(MODEL, OPTIMIZER, path=PATH, every=N)`` and
binds the recorder to ``VAR`` (default ``trajectory``) before the first line runs, so an interrupted
loop keeps what it recorded. ``%unload_ext lca_notebook`` undoes all three. In a notebook::

    %load_ext lca_notebook

    %%lca_record model opt --every 1
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    lca.analyze(model, data, trajectory)      # ends the cell: shows the explorer
"""

from __future__ import annotations

import contextlib

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

_NAMESPACE_NAME = "lca"


@magics_class
class LCAMagics(Magics):
    @magic_arguments()
    @argument("model", help="the nn.Module being trained (a name or expression in the notebook)")
    @argument("optimizer", help="its torch.optim optimizer")
    @argument("--every", type=int, default=1, help="snapshot after every N-th optimizer step (default 1)")
    @argument("--to", default=None, help="stream snapshots to a zarr store at this path instead of memory")
    @argument("--name", default="trajectory", help="variable that receives the recorder (default: trajectory)")
    @cell_magic
    def lca_record(self, line, cell):
        """Record the trajectory of the training loop in this cell: ``%%lca_record model opt --every 1``."""
        import lca_notebook

        args = parse_argstring(self.lca_record, line)
        if not args.name.isidentifier():
            raise ValueError(f"--name {args.name!r} is not a Python variable name; use e.g. --name trajectory")
        shell = self.shell
        assert shell is not None  # a cell magic always runs in a shell
        values = {}
        for role, expr in (("model", args.model), ("optimizer", args.optimizer)):
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
        with lca_notebook.record(values["model"], values["optimizer"], path=args.to, every=args.every) as recorder:
            shell.user_ns[args.name] = recorder
            exec(compiled, shell.user_ns)


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
