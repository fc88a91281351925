"""Base class for every typed config: unknown keys and wrong types are errors, never ignored.

Config classes live next to the code they configure (each objective owns its config in `methods/`);
`config.py` assembles them into the run config.
"""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys and re-validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
