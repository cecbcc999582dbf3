"""matplotlib is an optional extra: import it lazily with a clear message."""
import contextlib


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'hessfast[plot]' "
                          "(or pip install matplotlib).") from err
    return plt


@contextlib.contextmanager
def figure_axes(ax=None, path=None, figsize=(6, 4)):
    """Yield ``ax``, or the axes of a new figure when it is None; a new figure is laid out, saved to
    ``path`` (PNG, when given) and closed on exit. A caller's axes are left to the caller."""
    if ax is not None:
        yield ax
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
