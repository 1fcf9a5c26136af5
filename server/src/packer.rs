//! The packer: compresses chunks on worker threads so a shard's runtime never stalls on zstd.
//!
//! One pool per server, one worker per shard (compression competes with the shards for the
//! same cores, so more workers would not pay). A stream submits a chunk and gets a receiver
//! for the result; it keeps at most `burst.nexus.stream.parcel.packer.concurrency` chunks in
//! preparation at once and sends them in order, so the queue holds at most that many chunks
//! per compressed stream, all of them inside the stream's credit window.

use std::thread::JoinHandle;

use bytes::Bytes;
use nexus_protocol::compress::ChunkCompressor;
use tokio::sync::oneshot;

/// zstd level for chunks: level 1 compresses at several hundred MB/s per core.
const LEVEL: i32 = 1;

struct Job {
    raw: Bytes,
    /// The compressed chunk, or `None` when compression would not make it smaller.
    done: oneshot::Sender<Option<Bytes>>,
}

/// A pool of compression workers. Dropping it lets the workers finish their queue and exit.
pub(crate) struct Packer {
    jobs: Option<crossbeam_channel::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Packer {
    /// Starts `workers` threads.
    pub(crate) fn start(workers: usize) -> std::io::Result<Packer> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let workers = (0..workers.max(1))
            .map(|index| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("nexus-packer-{index}"))
                    .spawn(move || {
                        // One zstd context per worker, kept across chunks.
                        let mut compressor = ChunkCompressor::new(LEVEL);
                        for job in queue {
                            let Job { raw, done } = job;
                            let packed = compressor.compress(&raw);
                            // The raw chunk goes back to its stream; drop our reference first
                            // so the shard can recycle the buffer once it is sent.
                            drop(raw);
                            // A stream that stopped meanwhile no longer listens; that is fine.
                            let _ = done.send(packed);
                        }
                    })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Packer {
            jobs: Some(jobs),
            workers,
        })
    }

    /// Queues `raw` for compression. The receiver yields `None` (send it raw) when compression
    /// does not pay, and fails only if the pool is gone.
    pub(crate) fn submit(&self, raw: Bytes) -> oneshot::Receiver<Option<Bytes>> {
        let (done, result) = oneshot::channel();
        if let Some(jobs) = &self.jobs {
            // Fails only once the workers are gone; the dropped sender then fails the receiver.
            let _ = jobs.send(Job { raw, done });
        }
        result
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("A packer thread panicked.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_what_pays_and_leaves_the_rest() {
        let packer = Packer::start(2).unwrap();
        let text = Bytes::from("nexus moves bytes; ".repeat(10_000));
        let mut noise = vec![0u8; 65_536];
        getrandom::fill(&mut noise).unwrap();
        let noise = Bytes::from(noise);
        let packed = packer.submit(text.clone()).blocking_recv().unwrap();
        let packed = packed.expect("repeated text compresses");
        assert!(packed.len() < text.len() / 10);
        let back = nexus_protocol::compress::decompress_chunk(&packed, text.len() as u32).unwrap();
        assert_eq!(back, text);
        let raw = packer.submit(noise).blocking_recv().unwrap();
        assert!(raw.is_none(), "noise is sent raw");
    }

    #[test]
    fn drop_finishes_queued_jobs() {
        let packer = Packer::start(1).unwrap();
        let results: Vec<_> = (0..8)
            .map(|_| packer.submit(Bytes::from(vec![1u8; 1 << 16])))
            .collect();
        drop(packer);
        for result in results {
            assert!(result.blocking_recv().unwrap().is_some());
        }
    }
}
