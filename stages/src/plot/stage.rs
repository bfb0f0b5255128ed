//! The `plot` stage, and the overlay figures `pipe diff` asks the `scale`, `collect` and `train`
//! kinds for.

use std::path::{Path, PathBuf};

use engine::{Arity, Compared, InputSpec, ParamError, Stage, StageContext, StageError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::canvas::{Figure, Format, palette, render, title_of};
use super::data::{Latents, TrainLog};
use super::figures::{
    BelowThreshold, DecoderCosine, DeltaNorm, DeltaNormOverlay, FrequencyVsNu, NuHistograms, NuScatter,
    Training,
};
use crate::latents::{ClassThresholds, LatentTable};

pub struct PlotStage;

/// Parameters of the `plot` stage. Inputs: `latents` (one or more `scale` or `collect` stages;
/// the first is the one the single-crosscoder figures show, all appear in the threshold curves)
/// and optionally `training` (`train` stages, for the training curves).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlotParams {
    /// Files written for each figure.
    #[serde(default = "default_formats")]
    pub formats: Vec<Format>,
    /// Size of a one-panel figure in pixels (PNG; the SVG uses the same units). Text scales with
    /// the height; two-panel figures are twice as wide.
    #[serde(default = "default_width")]
    pub width: u32,
    #[serde(default = "default_height")]
    pub height: u32,
    /// Shown in every figure's title (say "Gemma 2 2B, BatchTopK").
    #[serde(default)]
    pub label: Option<String>,
    /// The class bands drawn on Δ_norm. They must be the upstream's: a table whose `class`
    /// column disagrees is an error.
    #[serde(default)]
    pub classes: ClassThresholds,
    /// Both axes of the ν scatter are cut to (0, nu_max) (the paper: 1.1).
    #[serde(default = "default_nu_max")]
    pub nu_max: f64,
    /// The template figure's cut: chat-only latents with more than this share of their
    /// activations on chat-template tokens.
    #[serde(default = "default_template_share")]
    pub template_share: f64,
}

fn default_formats() -> Vec<Format> {
    vec![Format::Png, Format::Svg]
}
fn default_width() -> u32 {
    1600
}
fn default_height() -> u32 {
    1000
}
fn default_nu_max() -> f64 {
    1.1
}
fn default_template_share() -> f64 {
    0.5
}

/// One entry of `figures.json`, the index the report embeds figures from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FigureEntry {
    /// The PNG (or the first format written), relative to the output folder.
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svg: Option<String>,
    pub title: String,
    pub caption: String,
}

impl Stage for PlotStage {
    type Params = PlotParams;
    const KIND: &'static str = "plot";
    const VERSION: u32 = 1;
    const DOC: &'static str = "The paper's figures (Δ_norm, ν scatter and histograms, thresholds, cosines, training) as PNG and SVG.";

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec::stage_of(
                "latents",
                &["scale", "collect"],
                Arity::Many,
                "Latent tables; the first is drawn alone, all appear in the threshold curves.",
            ),
            InputSpec::stage_of(
                "training",
                &["train"],
                Arity::OptionalMany,
                "Training runs whose curves are drawn.",
            ),
        ]
    }

    fn check(&self, p: &PlotParams) -> Result<(), ParamError> {
        if p.formats.is_empty() {
            return Err(ParamError::new(&["formats"], "needs at least one of \"png\", \"svg\""));
        }
        for (name, v, lo) in [("width", p.width, 400), ("height", p.height, 300)] {
            if !(lo..=8000).contains(&v) {
                return Err(ParamError::new(
                    &[name],
                    format!("must be between {lo} and 8000 pixels, got {v}"),
                ));
            }
        }
        if p.nu_max.is_nan() || p.nu_max <= 0.0 {
            return Err(ParamError::new(&["nu_max"], "must be positive"));
        }
        let c = &p.classes;
        if !(0.0 <= c.base_only
            && c.base_only <= c.shared_low
            && c.shared_low <= c.shared_high
            && c.shared_high <= c.chat_only
            && c.chat_only <= 1.0)
        {
            return Err(ParamError::new(
                &["classes"],
                "needs 0 ≤ base_only ≤ shared_low ≤ shared_high ≤ chat_only ≤ 1",
            ));
        }
        Ok(())
    }

    fn run(&self, p: &PlotParams, ctx: &mut StageContext) -> Result<(), StageError> {
        let out = ctx.out_dir().to_path_buf();
        let suffix = p.label.clone();
        let ups = ctx.inputs("latents").to_vec();
        let mut tables = Vec::new();
        for u in &ups {
            let path = u.dir.join("latents.parquet");
            let table = LatentTable::read_parquet(&path)
                .map_err(|e| StageError::failed(format!("input `{}`: {e}", u.stage)))?;
            if let Some((j, theirs, ours)) = Latents::class_mismatch(&table, &p.classes) {
                return Err(StageError::failed(format!(
                    "input `{}`: latent {j} is `{theirs}` in {} but `{ours}` with this stage's `classes`; \
                     give `classes` the thresholds that `{}` used",
                    u.stage,
                    path.display(),
                    u.stage
                )));
            }
            // The first table is the one drawn alone: `label` names it (its stage name when there
            // is no label but other tables); the others, in the threshold curves, by stage name.
            let label = match (&suffix, tables.is_empty()) {
                (Some(l), true) => l.clone(),
                _ if ups.len() > 1 => u.stage.clone(),
                _ => String::new(),
            };
            let l = Latents::from_table(&table, &label, &p.classes)
                .map_err(|e| StageError::failed(format!("input `{}`: {}: {e}", u.stage, path.display())))?;
            tables.push(l);
        }
        let mut logs = Vec::new();
        let train_ups = ctx.inputs("training").to_vec();
        for u in &train_ups {
            let label =
                if train_ups.len() > 1 { u.stage.clone() } else { suffix.clone().unwrap_or_default() };
            logs.push(
                TrainLog::read(&u.dir.join("metrics.jsonl"), &label)
                    .map_err(|e| StageError::failed(format!("input `{}`: {e}", u.stage)))?,
            );
        }
        let index = draw_figures(p, &tables, &logs, &out)?;
        let json = serde_json::to_vec_pretty(&index).map_err(StageError::other)?;
        std::fs::write(out.join("figures.json"), json)
            .map_err(|e| StageError::io(out.join("figures.json").display(), e))?;
        ctx.record_metric("figures", index.len());
        Ok(())
    }
}

/// Draws every figure the tables and logs allow into `out` (the first table alone; all tables in
/// the threshold curves; all logs in the training curves) and returns the `figures.json` index.
pub fn draw_figures(
    p: &PlotParams,
    tables: &[Latents],
    logs: &[TrainLog],
    out: &Path,
) -> Result<Vec<FigureEntry>, StageError> {
    let Some(first) = tables.first() else { return Err(StageError::failed("no latent table to draw")) };
    let one = (p.width, p.height);
    let two = (p.width * 2, p.height);
    let mut index = Vec::new();
    let mut add = |fig: &dyn Fn(&Path) -> Result<Vec<PathBuf>, StageError>, title: &str, caption: String| {
        let files = fig(out)?;
        index.push(entry(&files, title, caption));
        tracing::info!(
            "wrote {}",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
        Ok::<(), StageError>(())
    };
    let with_label = |title: &str| match &p.label {
        Some(l) if tables.len() > 1 => format!("{title} ({l})"),
        _ => title.to_string(),
    };
    let alive = first.alive_delta_norm().len();
    let counts = |l: &Latents| {
        use crate::latents::Class::*;
        format!(
            "{} chat-only, {} shared, {} base-only, {} other",
            l.count(ChatOnly),
            l.count(Shared),
            l.count(BaseOnly),
            l.count(Other)
        )
    };
    add(
        &|o| {
            draw(
                &DeltaNorm { latents: first, thresholds: &p.classes, size: one },
                o,
                "delta_norm",
                &p.formats,
            )
        },
        &with_label("Relative decoder norm difference Δ_norm"),
        format!(
            "Δ_norm over the {alive} non-dead of {} latents, 100 bins: {}{}. Dashed lines: class boundaries; inset: the chat-only band, 20 bins.",
            first.len(),
            counts(first),
            first.nu.as_ref().map_or(String::new(), |nu| format!(
                "; {} chat-specific (dark blue)",
                nu.chat_specific.iter().filter(|x| **x).count()
            )),
        ),
    )?;
    add(
        &|o| draw(&DecoderCosine { latents: first, size: one }, o, "decoder_cosine", &p.formats),
        &with_label("Decoder cosine similarity by class"),
        "cos(d_base, d_chat) of each non-dead latent, 20 bins on [-1, 1]; each class sums to 1.".into(),
    )?;
    if let Some(nu) = &first.nu {
        let n_chat = nu.chat_only.iter().filter(|x| **x).count();
        add(
            &|o| draw(&NuScatter { latents: first, max: p.nu_max, size: one }, o, "nu_scatter", &p.formats),
            &with_label("Latent Scaling: νᵋ against νʳ"),
            format!(
                "The effective chat-only set ({n_chat} latents) and the shared baseline, on (0, {}) in both ν; margins: histograms of each axis.",
                p.nu_max
            ),
        )?;
        let sets = vec![
            ("Chat only".to_string(), nu.chat_only.clone(), palette::CHAT_ONLY),
            ("Shared".to_string(), nu.shared.clone(), palette::SHARED),
        ];
        let fig = NuHistograms {
            title: title_of("ν ratios: chat-only against shared latents", &first.label),
            latents: first,
            sets,
            range: (-0.1, p.nu_max.max(1.1)),
            bins: 100,
            size: two,
        };
        add(
            &|o| draw(&fig, o, "nu_histograms", &p.formats),
            &with_label("ν ratios, chat-only against shared"),
            "νᵋ and νʳ of the effective chat-only set and the shared baseline, 100 bins; values outside the range are counted in the legend.".into(),
        )?;
        let runs: Vec<&Latents> = tables.iter().filter(|l| l.nu.is_some()).collect();
        add(
            &|o| draw(&BelowThreshold { runs: runs.clone(), size: one }, o, "latents_below_threshold", &p.formats),
            &with_label("Chat-only latents below a ν threshold"),
            "For π in [0, 1] (100 steps): latents of the effective chat-only set with |νᵋ| < π and |νʳ| < π; log scale.".into(),
        )?;
        if first.frequency.is_some() {
            add(
                &|o| draw(&FrequencyVsNu { latents: first, size: two }, o, "frequency_vs_nu", &p.formats),
                &with_label("Activation frequency against ν"),
                "Effective chat-only latents that fire: activation frequency (log) against νᵋ and νʳ, with Pearson's r on the frequency.".into(),
            )?;
        }
        if let Some(share) = &first.template_share {
            let template: Vec<bool> =
                nu.chat_only.iter().zip(share).map(|(c, s)| *c && *s > p.template_share).collect();
            let k = template.iter().filter(|x| **x).count();
            let fig = NuHistograms {
                title: title_of("ν ratios of chat-only latents on template tokens", &first.label),
                latents: first,
                sets: vec![
                    ("All chat-only".to_string(), nu.chat_only.clone(), palette::OTHER),
                    (format!("Template share > {}", p.template_share), template, palette::CHAT_ONLY),
                ],
                range: (-0.1, 1.1),
                bins: 50,
                size: two,
            };
            add(
                &|o| draw(&fig, o, "nu_template", &p.formats),
                &with_label("ν ratios of template-token latents"),
                format!(
                    "νᵋ and νʳ, 50 bins on [-0.1, 1.1]: all effective chat-only latents (grey) and the {k} with more than {} of their activations on chat-template tokens (blue).",
                    p.template_share
                ),
            )?;
        }
    } else {
        tracing::info!("`{}` has no ν columns (a collect table): the ν figures are skipped", first.label);
    }
    if !logs.is_empty() {
        add(
            &|o| {
                draw(
                    &Training { runs: logs, size: (p.width * 2, p.height * 2 * 7 / 10) },
                    o,
                    "training",
                    &p.formats,
                )
            },
            &with_label("Training curves"),
            "From metrics.jsonl: training batches (lines) and validation (lines with markers).".into(),
        )?;
    }
    Ok(index)
}

fn draw(fig: &impl Figure, dir: &Path, stem: &str, formats: &[Format]) -> Result<Vec<PathBuf>, StageError> {
    render(fig, dir, stem, formats).map_err(StageError::other)
}

fn entry(files: &[PathBuf], title: &str, caption: String) -> FigureEntry {
    let name = |f: &PathBuf| f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let png = files.iter().find(|f| f.extension().is_some_and(|x| x == "png"));
    let svg = files.iter().find(|f| f.extension().is_some_and(|x| x == "svg"));
    FigureEntry {
        file: name(png.or(svg).expect("at least one format")),
        svg: png.and(svg).map(name),
        title: title.to_string(),
        caption,
    }
}

/// `pipe diff` for latent tables (`scale`, `collect`): Δ_norm overlaid, and the threshold curves
/// when the tables have ν.
pub fn compare_latents(outputs: &[Compared], dest: &Path) -> Result<Vec<PathBuf>, StageError> {
    let thresholds = ClassThresholds::default();
    let runs: Vec<Latents> = outputs
        .iter()
        .map(|c| Latents::read(&c.dir, &c.label, &thresholds))
        .collect::<Result<_, _>>()
        .map_err(StageError::failed)?;
    let formats = default_formats();
    let size = (default_width(), default_height());
    let mut files =
        draw(&DeltaNormOverlay { runs: &runs, thresholds: &thresholds, size }, dest, "delta_norm", &formats)?;
    let with_nu: Vec<&Latents> = runs.iter().filter(|l| l.nu.is_some()).collect();
    if with_nu.len() >= 2 {
        files.extend(draw(
            &BelowThreshold { runs: with_nu, size },
            dest,
            "latents_below_threshold",
            &formats,
        )?);
    }
    Ok(files)
}

/// `pipe diff` for `train`: the training curves overlaid.
pub fn compare_training(outputs: &[Compared], dest: &Path) -> Result<Vec<PathBuf>, StageError> {
    let logs: Vec<TrainLog> = outputs
        .iter()
        .map(|c| TrainLog::read(&c.dir.join("metrics.jsonl"), &c.label))
        .collect::<Result<_, _>>()
        .map_err(StageError::failed)?;
    let size = (default_width() * 2, default_height() * 2 * 7 / 10);
    draw(&Training { runs: &logs, size }, dest, "training", &default_formats())
}
