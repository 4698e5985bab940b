//! The MobileOne stage plan: pairs of depthwise 3x3 and pointwise 1x1 blocks, the first pair with
//! stride 2, squeeze-excite in the last `num_se` pairs (the reference's `_make_stage`).

use super::{BlockSpec, MAX_CHANNELS, MAX_GEOMETRY};
use crate::error::{config, Result};

/// The constructor arguments of a `MobileOne` stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    pub num_blocks: i64,
    pub num_conv_branches: i64,
    pub use_se: bool,
    pub num_se: i64,
}

impl Default for StageSpec {
    fn default() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            num_blocks: 2,
            num_conv_branches: 1,
            use_se: false,
            num_se: 0,
        }
    }
}

/// Largest number of block pairs in one stage.
pub const MAX_BLOCKS: i64 = 4096;

impl StageSpec {
    /// Checks the stage arguments; block arguments are checked by [`BlockSpec::validate`].
    pub fn validate(&self) -> Result<()> {
        for (name, value, max) in [
            ("in_channels", self.in_channels, MAX_CHANNELS),
            ("out_channels", self.out_channels, MAX_CHANNELS),
            ("num_blocks_per_stage", self.num_blocks, MAX_BLOCKS),
            ("num_conv_branches", self.num_conv_branches, MAX_GEOMETRY),
        ] {
            if value < 1 || value > max {
                return Err(config(format!("{name} must be in [1, {max}], got {value}")));
            }
        }
        if self.num_se < 0 {
            return Err(config(format!("num_se must be >= 0, got {}", self.num_se)));
        }
        if self.use_se && self.num_se > self.num_blocks {
            return Err(config(format!(
                "Number of SE blocks cannot exceed number of layers: num_se={} > num_blocks_per_stage={}",
                self.num_se, self.num_blocks
            )));
        }
        Ok(())
    }

    /// How many of the last pairs carry SE (the reference ignores `num_se` without `use_se`).
    pub fn se_pairs(&self) -> i64 {
        if self.use_se {
            self.num_se
        } else {
            0
        }
    }
}

/// The blocks of a stage, in order: for each pair a depthwise then a pointwise block.
pub fn plan_stage(stage: &StageSpec) -> Result<Vec<BlockSpec>> {
    stage.validate()?;
    let mut blocks = Vec::with_capacity(2 * stage.num_blocks as usize);
    let mut channels = stage.in_channels;
    for ix in 0..stage.num_blocks {
        let use_se = ix >= stage.num_blocks - stage.se_pairs();
        let stride = if ix == 0 { 2 } else { 1 };
        let common = BlockSpec {
            use_se,
            num_conv_branches: stage.num_conv_branches,
            ..BlockSpec::default()
        };
        let depthwise = BlockSpec {
            in_channels: channels,
            out_channels: channels,
            kernel_size: 3,
            stride,
            padding: 1,
            groups: channels,
            ..common
        };
        let pointwise = BlockSpec {
            in_channels: channels,
            out_channels: stage.out_channels,
            kernel_size: 1,
            padding: 0,
            ..common
        };
        for block in [depthwise, pointwise] {
            block.validate()?;
            blocks.push(block);
        }
        channels = stage.out_channels;
    }
    Ok(blocks)
}
