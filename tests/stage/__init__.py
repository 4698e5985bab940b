"""The seed's MobileOne stages."""
