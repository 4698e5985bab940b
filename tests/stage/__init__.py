"""The reference's MobileOne stages."""
