//! Block validation, the stage plan and the user's yaml.

use mobileone_rs::spec::yaml::{make_divisible, mobileone_layers};
use mobileone_rs::BlockSpec;
use mobileone_rs::Error;
use mobileone_rs::{plan_stage, StageSpec};

fn config_message(spec: BlockSpec) -> String {
    match spec.validate() {
        Err(Error::Config(msg)) => msg,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn invalid_blocks_name_the_argument() {
    let ok = BlockSpec {
        in_channels: 4,
        out_channels: 4,
        groups: 4,
        ..BlockSpec::default()
    };
    assert!(ok.validate().is_ok());
    assert!(config_message(BlockSpec {
        in_channels: 0,
        ..ok
    })
    .contains("in_channels"));
    assert!(config_message(BlockSpec { groups: 3, ..ok }).contains("groups"));
    assert!(config_message(BlockSpec {
        kernel_size: 4,
        padding: 2,
        ..ok
    })
    .contains("odd"));
    assert!(config_message(BlockSpec { padding: 0, ..ok }).contains("padding"));
    assert!(config_message(BlockSpec {
        num_conv_branches: 0,
        ..ok
    })
    .contains("num_conv_branches"));
    assert!(config_message(BlockSpec { use_se: true, ..ok }).contains("SE"));
    assert!(config_message(BlockSpec {
        out_channels: 1 << 40,
        ..ok
    })
    .contains("out_channels"));
}

#[test]
fn stage_plan_follows_the_seed() {
    let spec = StageSpec {
        in_channels: 128,
        out_channels: 256,
        num_blocks: 10,
        num_conv_branches: 4,
        use_se: true,
        num_se: 1,
    };
    let blocks = plan_stage(&spec).unwrap();
    assert_eq!(blocks.len(), 20);
    assert_eq!(
        (blocks[0].stride, blocks[0].groups, blocks[0].kernel_size),
        (2, 128, 3)
    );
    assert_eq!(
        (
            blocks[1].in_channels,
            blocks[1].out_channels,
            blocks[1].kernel_size
        ),
        (128, 256, 1)
    );
    assert_eq!(
        (blocks[2].stride, blocks[2].groups, blocks[2].in_channels),
        (1, 256, 256)
    );
    assert_eq!(blocks.iter().filter(|b| b.use_se).count(), 2);
    assert!(blocks[18].use_se && blocks[19].use_se);
}

#[test]
fn too_many_se_blocks_is_an_error() {
    let spec = StageSpec {
        in_channels: 64,
        out_channels: 64,
        num_blocks: 2,
        num_conv_branches: 4,
        use_se: true,
        num_se: 3,
    };
    assert!(matches!(plan_stage(&spec), Err(Error::Config(m)) if m.contains("SE blocks")));
}

#[test]
fn seed_yaml_resolves_the_four_stages() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/mobileone_rs/data/yolov9-c-mobileone.yaml"
    ))
    .unwrap();
    let layers = mobileone_layers(&text, 3).unwrap();
    let got: Vec<_> = layers
        .iter()
        .map(|l| {
            (
                l.index,
                l.spec.in_channels,
                l.spec.out_channels,
                l.spec.num_blocks,
                l.input_stride,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (2, 64, 64, 2, 2),
            (3, 64, 128, 8, 4),
            (4, 128, 256, 10, 8),
            (5, 256, 512, 1, 16)
        ]
    );
    assert!(layers[2].spec.use_se && !layers[1].spec.use_se);
    assert_eq!(make_divisible(64.0 * 0.25, 8), 16);
    assert_eq!(make_divisible(20.0, 8), 24);
}

#[test]
fn bad_yaml_is_a_yaml_error() {
    assert!(matches!(
        mobileone_layers("backbone: [[-1, 1]]", 3),
        Err(Error::Yaml(_))
    ));
    assert!(matches!(mobileone_layers(":::", 3), Err(Error::Yaml(_))));
    assert!(
        matches!(mobileone_layers("backbone: [[-1, 1, Conv, [64, 3, 2]]]", 3), Err(Error::Yaml(m)) if m.contains("no MobileOne"))
    );
}

#[test]
fn pretrained_yamls_resolve_the_stem_block_row() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/mobileone_rs/data/yolov9-c-mobileone-s0.yaml"
    ))
    .unwrap();
    let layers = mobileone_layers(&text, 3).unwrap();
    // The MobileOneBlock stem (layer 1, 48 wide, stride 2) feeds the first stage.
    let first = &layers[0];
    assert_eq!(
        (first.index, first.spec.in_channels, first.input_stride),
        (2, 48, 2)
    );
    assert_eq!(layers.len(), 4);
}
