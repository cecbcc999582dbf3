"""matplotlib is an optional extra: import it lazily with a clear message."""


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'hessfast[plot]' (or pip install matplotlib).") from err
    return plt
