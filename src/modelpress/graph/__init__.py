"""Model graphs: torch.fx tracing (fold_bn's tracer) and channel dependency groups for structured pruning."""
from .channels import Group, Member, Seg, channel_groups, feature_maps

__all__ = ["Group", "Member", "Seg", "channel_groups", "feature_maps"]
