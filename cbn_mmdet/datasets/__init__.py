from .digits_coco import CLASSES as DIGITS_CLASSES
from .digits_coco import generate as generate_digits_coco

__all__ = ['DIGITS_CLASSES', 'generate_digits_coco']
