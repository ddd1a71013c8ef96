//! Writes GGUF v3 files as a stream: header, metadata and tensor table first, then each
//! tensor's bytes in table order, handed over by the caller a chunk at a time, so a file of
//! any size is written in bounded memory. It knows the container format only; what the
//! tensors hold is the caller's business (`synth.rs`), and reading is `gguf.rs`.

use std::io::{self, Write};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

/// Tensor data alignment. It is GGUF's default, so (like llama.cpp) no `general.alignment`
/// key is written.
pub const ALIGNMENT: u64 = 32;

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    /// Candle's order, outermost first: `(rows, cols)` for a matrix, `(width)` for a vector.
    /// GGUF stores them innermost first; the writer reverses them.
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorEntry {
    /// Bytes of the tensor's data, without the padding that follows it.
    pub fn n_bytes(&self) -> u64 {
        let n_elems: usize = self.dims.iter().product();
        (n_elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// A GGUF file being written: `start` writes everything up to the tensor data, `write`
/// appends data to the current tensor (moving on to the next one when it is full), and
/// `finish` checks that every tensor got exactly its size.
pub struct StreamWriter<W: Write> {
    out: W,
    sizes: Vec<u64>,
    current: usize,
    written_in_current: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header, `metadata` in order, the tensor table with each tensor's offset
    /// (data sizes rounded up to `ALIGNMENT`) and the padding before the data section.
    pub fn start(
        mut out: W,
        metadata: &[(String, Value)],
        tensors: &[TensorEntry],
    ) -> io::Result<StreamWriter<W>> {
        let mut sizes = Vec::with_capacity(tensors.len());
        for tensor in tensors {
            let n_elems: usize = tensor.dims.iter().product();
            if tensor.dims.is_empty() || !n_elems.is_multiple_of(tensor.dtype.block_size()) {
                return Err(invalid(format!(
                    "tensor `{}` of shape {:?} is not a whole number of {:?} blocks",
                    tensor.name, tensor.dims, tensor.dtype
                )));
            }
            sizes.push(tensor.n_bytes());
        }

        let mut header = Counting { out: &mut out, n_bytes: 0 };
        header.write_all(b"GGUF")?;
        header.write_all(&3u32.to_le_bytes())?;
        header.write_all(&(tensors.len() as u64).to_le_bytes())?;
        header.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            write_string(&mut header, key)?;
            header.write_all(&value_type_id(value).to_le_bytes())?;
            write_value(&mut header, key, value)?;
        }
        let mut offset = 0u64;
        for (tensor, size) in tensors.iter().zip(&sizes) {
            write_string(&mut header, &tensor.name)?;
            header.write_all(&(tensor.dims.len() as u32).to_le_bytes())?;
            for dim in tensor.dims.iter().rev() {
                header.write_all(&(*dim as u64).to_le_bytes())?;
            }
            header.write_all(&ggml_type_id(tensor.dtype).to_le_bytes())?;
            header.write_all(&offset.to_le_bytes())?;
            offset += size.next_multiple_of(ALIGNMENT);
        }
        let padding = padding_after(header.n_bytes);
        header.write_all(&[0u8; ALIGNMENT as usize][..padding])?;
        Ok(StreamWriter { out, sizes, current: 0, written_in_current: 0 })
    }

    /// Appends `bytes` to the tensor being written; a chunk may not run past its end.
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let Some(&size) = self.sizes.get(self.current) else {
                return Err(invalid(format!(
                    "{} bytes of tensor data past the last tensor",
                    bytes.len()
                )));
            };
            let room = (size - self.written_in_current) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.out.write_all(now)?;
            self.written_in_current += now.len() as u64;
            if self.written_in_current == size {
                self.out.write_all(&[0u8; ALIGNMENT as usize][..padding_after(size)])?;
                self.current += 1;
                self.written_in_current = 0;
            }
            bytes = rest;
        }
        Ok(())
    }

    /// Checks that every tensor is complete and hands back the writer (not flushed).
    pub fn finish(self) -> io::Result<W> {
        if self.current < self.sizes.len() {
            return Err(invalid(format!(
                "tensor {} of {} has {} of its {} bytes",
                self.current + 1,
                self.sizes.len(),
                self.written_in_current,
                self.sizes[self.current]
            )));
        }
        Ok(self.out)
    }
}

/// The size of the file `StreamWriter` produces for `metadata` and `tensors`.
pub fn file_size(metadata: &[(String, Value)], tensors: &[TensorEntry]) -> io::Result<u64> {
    let mut counter = Counting { out: io::sink(), n_bytes: 0 };
    StreamWriter::start(&mut counter, metadata, tensors)?;
    let data: u64 = tensors.iter().map(|t| t.n_bytes().next_multiple_of(ALIGNMENT)).sum();
    Ok(counter.n_bytes + data)
}

/// The GGUF (ggml) type id of a tensor type.
pub fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn padding_after(n_bytes: u64) -> usize {
    (n_bytes.next_multiple_of(ALIGNMENT) - n_bytes) as usize
}

/// Counts the header's bytes on the way through, for the padding before the data.
struct Counting<W: Write> {
    out: W,
    n_bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.n_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn write_string<W: Write>(out: &mut W, s: &str) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

/// GGUF's `gguf_type` ids.
fn value_type_id(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value<W: Write>(out: &mut W, key: &str, value: &Value) -> io::Result<()> {
    match value {
        Value::U8(v) => out.write_all(&v.to_le_bytes()),
        Value::I8(v) => out.write_all(&v.to_le_bytes()),
        Value::U16(v) => out.write_all(&v.to_le_bytes()),
        Value::I16(v) => out.write_all(&v.to_le_bytes()),
        Value::U32(v) => out.write_all(&v.to_le_bytes()),
        Value::I32(v) => out.write_all(&v.to_le_bytes()),
        Value::U64(v) => out.write_all(&v.to_le_bytes()),
        Value::I64(v) => out.write_all(&v.to_le_bytes()),
        Value::F32(v) => out.write_all(&v.to_le_bytes()),
        Value::F64(v) => out.write_all(&v.to_le_bytes()),
        Value::Bool(v) => out.write_all(&[u8::from(*v)]),
        Value::String(v) => write_string(out, v),
        Value::Array(values) => {
            // GGUF arrays have one element type, written once before the elements.
            let element_type = values.first().map_or(value_type_id(&Value::U32(0)), value_type_id);
            if values.iter().any(|v| value_type_id(v) != element_type) {
                return Err(invalid(format!("metadata array `{key}` mixes value types")));
            }
            out.write_all(&element_type.to_le_bytes())?;
            out.write_all(&(values.len() as u64).to_le_bytes())?;
            values.iter().try_for_each(|v| write_value(out, key, v))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use candle_core::quantized::gguf_file::Content;

    use super::*;

    fn entry(name: &str, dims: &[usize], dtype: GgmlDType) -> TensorEntry {
        TensorEntry { name: name.to_string(), dims: dims.to_vec(), dtype }
    }

    #[test]
    fn candle_reads_back_metadata_table_and_data() {
        let metadata: Vec<(String, Value)> = vec![
            ("a.u8".into(), Value::U8(7)),
            ("a.i16".into(), Value::I16(-3)),
            ("a.u32".into(), Value::U32(40_960)),
            ("a.i64".into(), Value::I64(-1)),
            ("a.f32".into(), Value::F32(1e-6)),
            ("a.f64".into(), Value::F64(0.5)),
            ("a.bool".into(), Value::Bool(true)),
            ("a.str".into(), Value::String("Qwen3 é".into())),
            ("a.arr".into(), Value::Array(vec![Value::I32(1), Value::I32(-2)])),
            ("a.empty".into(), Value::Array(vec![])),
        ];
        // 3 * 4 = 12 f32 bytes (padded to 32), then one Q8_0 row of 2 blocks (68 bytes).
        let tensors = [entry("norm", &[3], GgmlDType::F32), entry("w", &[1, 64], GgmlDType::Q8_0)];
        let mut writer = StreamWriter::start(Cursor::new(Vec::new()), &metadata, &tensors).unwrap();
        let norm: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        writer.write(&norm[..5]).unwrap();
        // One call may finish a tensor and start the next.
        let mut rest = norm[5..].to_vec();
        rest.extend((0..68).map(|i| i as u8));
        writer.write(&rest).unwrap();
        let bytes = writer.finish().unwrap().into_inner();
        assert_eq!(bytes.len() as u64, file_size(&metadata, &tensors).unwrap());

        let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(content.tensor_data_offset % ALIGNMENT, 0);
        assert_eq!(content.metadata["a.u32"].to_u32().unwrap(), 40_960);
        assert_eq!(content.metadata["a.i16"].to_i16().unwrap(), -3);
        assert_eq!(content.metadata["a.str"].to_string().unwrap(), "Qwen3 é");
        assert_eq!(content.metadata["a.f32"].to_f32().unwrap(), 1e-6);
        assert!(content.metadata["a.bool"].to_bool().unwrap());
        assert_eq!(content.metadata["a.arr"].to_vec().unwrap()[1].to_i32().unwrap(), -2);
        assert!(content.metadata["a.empty"].to_vec().unwrap().is_empty());
        let w = &content.tensor_infos["w"];
        assert_eq!((w.shape.dims(), w.ggml_dtype, w.offset), (&[1, 64][..], GgmlDType::Q8_0, 32));
        let start = (content.tensor_data_offset + 32) as usize;
        assert_eq!(bytes[start..start + 68], (0..68).map(|i| i as u8).collect::<Vec<_>>()[..]);
        let norm_start = content.tensor_data_offset as usize;
        assert_eq!(bytes[norm_start..norm_start + 12], norm[..]);
    }

    #[test]
    fn refuses_wrong_data_sizes_and_bad_shapes() {
        let tensors = [entry("w", &[1, 32], GgmlDType::Q8_0)];
        let mut writer = StreamWriter::start(Vec::new(), &[], &tensors).unwrap();
        writer.write(&[0u8; 30]).unwrap();
        let msg = writer.finish().err().unwrap().to_string();
        assert_eq!(msg, "tensor 1 of 1 has 30 of its 34 bytes");

        let mut writer = StreamWriter::start(Vec::new(), &[], &tensors).unwrap();
        let msg = writer.write(&[0u8; 35]).unwrap_err().to_string();
        assert_eq!(msg, "1 bytes of tensor data past the last tensor");

        let odd = [entry("w", &[2, 100], GgmlDType::Q4K)];
        let msg = StreamWriter::start(Vec::new(), &[], &odd).err().unwrap().to_string();
        assert!(msg.contains("not a whole number of Q4K blocks"), "{msg}");

        let mixed = [("k".to_string(), Value::Array(vec![Value::U8(1), Value::I8(1)]))];
        let msg = StreamWriter::start(Vec::new(), &mixed, &[]).err().unwrap().to_string();
        assert_eq!(msg, "metadata array `k` mixes value types");
    }
}
