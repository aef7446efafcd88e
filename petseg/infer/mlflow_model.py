"""The pyfunc's former home, kept so that models logged by earlier petseg releases still load.

MLflow pickles a model's :class:`~petseg.model.pyfunc.PetsegModel` by reference to the module that
defined it; models logged before it moved to :mod:`petseg.model.pyfunc` name this one.
"""

from petseg.model.pyfunc import PetsegModel

__all__ = ["PetsegModel"]
