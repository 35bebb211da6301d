"""Models: timm backbones behind one factory, the AGFN head and a linear baseline."""

from mpoxscope.models.agfn import AGFNHead, AttentionMaps, LinearHead
from mpoxscope.models.backbones import backbone_stages, target_layer
from mpoxscope.models.factory import SkinLesionNet, create_model
from mpoxscope.models.pretrained import load_pretrained

__all__ = ["AGFNHead", "AttentionMaps", "LinearHead", "SkinLesionNet", "backbone_stages", "create_model",
           "load_pretrained", "target_layer"]
