//! The YOLO model yaml (serde_yaml): finds the `MobileOne` layers and resolves their channels the
//! way YOLOv9's `parse_model` does. The only file that touches YAML.

use serde::Deserialize;
use serde_yaml::Value;

use super::stage::StageSpec;
use crate::error::{Error, Result};

/// Modules whose first argument is their output width, scaled by `width_multiple`.
const WIDTH_MODULES: &[&str] = &[
    "Conv",
    "AConv",
    "ConvTranspose",
    "Bottleneck",
    "SPP",
    "SPPF",
    "DWConv",
    "BottleneckCSP",
    "nn.ConvTranspose2d",
    "DWConvTranspose2d",
    "SPPCSPC",
    "ADown",
    "RepNCSPELAN4",
    "SPPELAN",
    "ELAN1",
    "RepConvN",
    "MobileOne",
    "MobileOneBlock",
];

#[derive(Debug, Deserialize)]
struct ModelYaml {
    #[serde(default = "one")]
    width_multiple: f64,
    backbone: Vec<Value>,
    #[serde(default)]
    head: Vec<Value>,
}

fn one() -> f64 {
    1.0
}

/// One `MobileOne` row of a model yaml, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct StageLayer {
    /// The layer index, as YOLOv9 prints it.
    pub index: usize,
    /// The stage's constructor arguments, input channels prepended as `parse_model` does.
    pub spec: StageSpec,
    /// The total stride of the layer's input relative to the image.
    pub input_stride: i64,
}

/// YOLOv9's `make_divisible`: `ceil(x / divisor) * divisor`.
pub fn make_divisible(x: f64, divisor: i64) -> i64 {
    (x / divisor as f64).ceil() as i64 * divisor
}

fn yaml_err(msg: String) -> Error {
    Error::Yaml(msg)
}

/// Parses a model yaml and returns its `MobileOne` layers with resolved channels.
pub fn mobileone_layers(text: &str, image_channels: i64) -> Result<Vec<StageLayer>> {
    let model: ModelYaml =
        serde_yaml::from_str(text).map_err(|e| yaml_err(format!("invalid model yaml: {e}")))?;
    let mut channels: Vec<i64> = Vec::new();
    let mut strides: Vec<i64> = Vec::new();
    let mut stages = Vec::new();
    for (index, row) in model.backbone.iter().chain(&model.head).enumerate() {
        let layer = Row::parse(index, row)?;
        let (c_in, s_in) = layer.input(&channels, &strides, image_channels)?;
        let (c_out, stride) = layer.output(c_in, model.width_multiple)?;
        if layer.module == "MobileOne" {
            stages.push(StageLayer {
                index,
                spec: layer.stage_spec(c_in, c_out)?,
                input_stride: s_in,
            });
        }
        channels.push(c_out);
        strides.push(s_in * stride);
    }
    if stages.is_empty() {
        return Err(yaml_err("the model yaml has no MobileOne layer".into()));
    }
    Ok(stages)
}

/// One `[from, number, module, args]` row.
struct Row<'a> {
    index: usize,
    from: Vec<i64>,
    module: &'a str,
    args: &'a [Value],
}

impl<'a> Row<'a> {
    fn parse(index: usize, row: &'a Value) -> Result<Self> {
        let bad = || {
            yaml_err(format!(
                "layer {index}: expected [from, number, module, args], got {row:?}"
            ))
        };
        let items = row.as_sequence().filter(|s| s.len() == 4).ok_or_else(bad)?;
        let from = match &items[0] {
            Value::Number(n) => vec![n.as_i64().ok_or_else(bad)?],
            Value::Sequence(s) => s
                .iter()
                .map(|v| v.as_i64().ok_or_else(bad))
                .collect::<Result<_>>()?,
            _ => return Err(bad()),
        };
        let module = items[2].as_str().ok_or_else(bad)?;
        let args = items[3].as_sequence().map(Vec::as_slice).ok_or_else(bad)?;
        Ok(Self {
            index,
            from,
            module,
            args,
        })
    }

    fn resolve(&self, from: i64, len: usize) -> Result<usize> {
        let at = if from < 0 { len as i64 + from } else { from };
        if at < 0 || at >= len as i64 {
            return Err(yaml_err(format!(
                "layer {}: 'from' index {from} is out of range",
                self.index
            )));
        }
        Ok(at as usize)
    }

    /// Input channels and stride, from the first `from` layer (or the image for layer 0).
    fn input(&self, channels: &[i64], strides: &[i64], image_channels: i64) -> Result<(i64, i64)> {
        if channels.is_empty() {
            return Ok((image_channels, 1));
        }
        let first = self.resolve(self.from[0], channels.len())?;
        let channels_in = if self.module == "Concat" {
            self.from
                .iter()
                .map(|&f| self.resolve(f, channels.len()).map(|i| channels[i]))
                .sum::<Result<i64>>()?
        } else {
            channels[first]
        };
        Ok((channels_in, strides[first]))
    }

    fn int_arg(&self, at: usize, default: i64) -> Result<i64> {
        match self.args.get(at) {
            None => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| {
                yaml_err(format!(
                    "layer {} ({}): argument {at} must be an integer, got {v:?}",
                    self.index, self.module
                ))
            }),
        }
    }

    /// Output channels and this layer's own stride.
    fn output(&self, channels_in: i64, width: f64) -> Result<(i64, i64)> {
        if !WIDTH_MODULES.contains(&self.module) {
            return Ok((channels_in, 1));
        }
        let c2 = make_divisible(self.int_arg(0, 0)? as f64 * width, 8);
        let stride = match self.module {
            // MobileOneBlock rows are [out_channels, kernel_size, stride, padding], as Conv's.
            "Conv" | "DWConv" | "MobileOneBlock" => self.int_arg(2, 1)?,
            "ADown" | "AConv" | "MobileOne" => 2,
            _ => 1,
        };
        Ok((c2, stride))
    }

    fn stage_spec(&self, in_channels: i64, out_channels: i64) -> Result<StageSpec> {
        let use_se = match self.args.get(3) {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                yaml_err(format!(
                    "layer {} (MobileOne): use_se must be a bool, got {v:?}",
                    self.index
                ))
            })?,
        };
        let spec = StageSpec {
            in_channels,
            out_channels,
            num_blocks: self.int_arg(1, 2)?,
            num_conv_branches: self.int_arg(2, 1)?,
            use_se,
            num_se: self.int_arg(4, 0)?,
        };
        spec.validate()?;
        Ok(spec)
    }
}
