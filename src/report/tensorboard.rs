//! TensorBoard event files (`RUN_DIR/tb/events.out.tfevents.*`), so `tensorboard --logdir
//! runs` shows prefhost's runs beside others.
//!
//! The format, as TensorFlow's record writer and TensorBoard's event reader define it: a
//! sequence of records, each `u64 length (LE) | u32 masked CRC32C of the length bytes |
//! data | u32 masked CRC32C of data`, where data is an `Event` protobuf. The first event
//! carries `file_version: "brain.Event:2"`; scalars are `Summary.Value.simple_value`; text
//! (prefhost's reload and other events) is a string tensor with plugin "text"; a resumed run
//! writes `SessionLog START` at its first step, which makes TensorBoard drop the points the
//! interrupted run logged past its checkpoint. The messages below are the fields of
//! tensorflow/core/util/event.proto and framework/summary.proto, tensor.proto and
//! tensor_shape.proto that prefhost writes, with their field numbers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// DataType: 7 = DT_STRING.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<TensorDim>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorDim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// SessionStatus: 1 = START.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const DT_STRING: i32 = 7;
const SESSION_START: i32 = 1;

/// TensorFlow's masked CRC32C: stored CRCs are rotated and offset so that a CRC over data
/// holding CRCs stays well distributed.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One framed record: length, its CRC, the data, the data's CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Appends events to one new file in a run's `tb/` folder.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new events file in `dir` (created if needed), named as TensorBoard's writers name
    /// theirs (`events.out.tfevents.SECONDS.HOST.PID`, which TensorBoard reads in name order).
    /// With `resumed_at`, it starts with SessionLog START at that step.
    pub fn create(dir: &Path, host: &str, resumed_at: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let name = format!("events.out.tfevents.{:010}.{host}.{}", now() as u64, std::process::id());
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = Self { file, path };
        writer.write(Event { wall_time: now(), file_version: Some("brain.Event:2".into()), ..Default::default() })?;
        if let Some(step) = resumed_at {
            writer.write(Event {
                wall_time: now(),
                step: step as i64,
                session_log: Some(SessionLog { status: SESSION_START }),
                ..Default::default()
            })?;
        }
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding every value of `values` as a scalar at `step`.
    pub fn scalars(&mut self, step: usize, values: &BTreeMap<String, f64>) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue { tag: tag.clone(), simple_value: Some(*v as f32), ..Default::default() })
            .collect();
        self.write(Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary { value }),
            ..Default::default()
        })
    }

    /// A text summary (markdown, as TensorBoard's text plugin shows it) at `step`.
    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        let tensor = TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(TensorShape { dim: vec![TensorDim { size: 1 }] }),
            string_val: vec![text.as_bytes().to_vec()],
        };
        let value = SummaryValue {
            tag: tag.into(),
            tensor: Some(tensor),
            metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into() }) }),
            ..Default::default()
        };
        self.write(Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary { value: vec![value] }),
            ..Default::default()
        })
    }

    /// One whole record per write call, flushed: a crash leaves whole records, or a cut-off
    /// last one that readers stop at.
    fn write(&mut self, event: Event) -> Result<()> {
        self.file.write_all(&record(&event.encode_to_vec())).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The events of one file, each record's framing and both CRCs checked; an error names the
/// file and the byte offset of the first bad record.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let bad = |what: &str| anyhow::anyhow!("{}: record at byte {at}: {what}", path.display());
        let header = bytes.get(at..at + 12).ok_or_else(|| bad("cut short in its header"))?;
        let (length, length_crc) = header.split_at(8);
        if masked_crc32c(length) != u32::from_le_bytes(length_crc.try_into().unwrap()) {
            return Err(bad("length CRC does not match"));
        }
        let length = u64::from_le_bytes(length.try_into().unwrap()) as usize;
        let body = bytes.get(at + 12..at + 12 + length + 4).ok_or_else(|| bad("cut short in its data"))?;
        let (data, data_crc) = body.split_at(length);
        if masked_crc32c(data) != u32::from_le_bytes(data_crc.try_into().unwrap()) {
            return Err(bad("data CRC does not match"));
        }
        events.push(Event::decode(data).map_err(|e| bad(&format!("not an Event: {e}")))?);
        at += 12 + length + 4;
    }
    if events.first().and_then(|e| e.file_version.as_deref()) != Some("brain.Event:2") {
        bail!("{}: does not start with file_version brain.Event:2", path.display());
    }
    Ok(events)
}
