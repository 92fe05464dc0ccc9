"""Suite-wide settings."""
import gc


def pytest_collection_finish(session) -> None:
    """Everything imported or built while collecting lives to the end: freezing it keeps the
    full garbage collections that shard() runs (to hand the plan check's memory back) from
    walking torch's and transformers' object graphs every time."""
    gc.freeze()
