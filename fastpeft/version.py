__version__ = "0.1.0"


def installed_version(distribution):
    """The installed version of ``distribution`` (a pip name such as "transformers"), None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
