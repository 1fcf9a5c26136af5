//! Receive buffers of a connection that takes bulk data (a client's pulls, a server's pushes).
//!
//! CHUNK data reaches the consumer as slices of the buffer the socket was read into (zero
//! copy). Two costs hide in a plain growing buffer, and this module removes both:
//! - a frame that straddles the end of a buffer is moved to a new one: up to a whole chunk
//!   copied, per chunk. Here each read is bounded so that every frame that starts in it has
//!   `ROOM` bytes ahead in the same block: a frame of the usual size is never moved.
//! - a fresh buffer is fresh memory, and its first touch is a page fault per page. Here a
//!   block is retired, not freed, and taken again once the consumers dropped all its chunks.
//!
//! Memory: a block is `BLOCK` bytes; chunks smaller than `COPY_BELOW` are copied out by the
//! caller, so that a chunk a consumer holds pins at most four times its own size. A
//! connection with no stream keeps only its current block (`release_idle`): an idle pooled
//! connection holds 4 MiB, not the blocks of its last burst.

use std::collections::VecDeque;

use bytes::BytesMut;

/// Size of a receive block.
pub const BLOCK: usize = 4 << 20;
/// Chunks smaller than this are copied out of the block (see the module documentation).
pub const COPY_BELOW: usize = BLOCK / 4;
/// Room kept ahead of any frame start: a default chunk frame (1 MiB of data and its header)
/// with margin. Larger frames are correct too; they may be moved once.
const ROOM: usize = (1 << 20) + (64 << 10);
/// The least a read asks for when no frame length is known.
const PROBE: usize = 64 << 10;
/// Retired blocks kept while their chunks are still held; beyond it the oldest is let go
/// (its memory is freed when its last chunk is dropped).
const MAX_RETIRED: usize = 32;
/// Blocks kept idle for reuse; more are freed.
const KEEP_IDLE: usize = 2;

/// The blocks of one connection: its current receive buffer lives in the protocol's inbox,
/// the retired ones here.
#[derive(Debug, Default)]
pub struct RecvBlocks {
    retired: VecDeque<BytesMut>,
    /// Blocks allocated, for tests and the curious.
    allocated: u64,
}

impl RecvBlocks {
    /// Makes `buf` ready for the next read and returns the most that read may take.
    ///
    /// `pending` is the length of the frame `buf` starts with, when its header is in
    /// (`ClientConnection::pending_frame_len`).
    pub fn prepare(&mut self, buf: &mut BytesMut, pending: Option<usize>) -> usize {
        match pending {
            Some(total) => {
                let need = total.saturating_sub(buf.len());
                if need > spare(buf) {
                    // A frame larger than ROOM: one move, to a block it fits in whole.
                    self.replace(buf, total + ROOM);
                }
                // The rest of this frame, and more only while any frame starting there has
                // ROOM ahead.
                need.max(spare(buf).saturating_sub(ROOM))
            }
            None => {
                if spare(buf) < ROOM + PROBE {
                    // Normally at most a partial header to carry over.
                    self.replace(buf, buf.len() + BLOCK);
                }
                spare(buf) - ROOM
            }
        }
    }

    /// Lets go of the retired blocks: the free ones now, the ones consumers still hold when
    /// their last chunk is dropped. For a connection with no stream running.
    pub fn release_idle(&mut self) {
        self.retired.clear();
    }

    /// Moves what `buf` holds to a block of at least `capacity` and retires the old one.
    fn replace(&mut self, buf: &mut BytesMut, capacity: usize) {
        let mut block = self.take(capacity.max(BLOCK));
        block.extend_from_slice(buf);
        let mut old = std::mem::replace(buf, block);
        old.clear();
        self.retired.push_back(old);
        if self.retired.len() > MAX_RETIRED {
            self.retired.pop_front();
        }
    }

    /// A retired block whose chunks are all dropped, or a new one.
    fn take(&mut self, capacity: usize) -> BytesMut {
        let mut found = None;
        let mut idle = 0;
        let mut i = 0;
        while i < self.retired.len() {
            // Succeeds once no chunk shares the block any more (or its tail alone is enough).
            if self.retired[i].try_reclaim(capacity) {
                if found.is_none() {
                    found = self.retired.remove(i);
                    continue;
                }
                idle += 1;
                if idle > KEEP_IDLE {
                    self.retired.remove(i);
                    continue;
                }
            }
            i += 1;
        }
        found.unwrap_or_else(|| {
            self.allocated += 1;
            BytesMut::with_capacity(capacity)
        })
    }

    #[cfg(test)]
    fn allocated(&self) -> u64 {
        self.allocated
    }
}

fn spare(buf: &BytesMut) -> usize {
    buf.capacity() - buf.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const HEADER: usize = 12;

    /// Plays a socket holding `frames` (total lengths) back to back: reads as much as each
    /// `prepare` allows, cuts whole frames off as the protocol does, and hands them to
    /// `consume`. Returns how many times a frame's payload moved to another block.
    fn play(blocks: &mut RecvBlocks, frames: &[usize], mut consume: impl FnMut(Bytes)) -> usize {
        let wire: Vec<u8> = frames
            .iter()
            .enumerate()
            .flat_map(|(i, &len)| {
                let mut f = (len as u32 - HEADER as u32).to_be_bytes().to_vec();
                f.resize(len, i as u8);
                f
            })
            .collect();
        let mut buf = BytesMut::new();
        let (mut at, mut moves) = (0, 0);
        while at < wire.len() || !buf.is_empty() {
            let pending = (buf.len() >= HEADER)
                .then(|| HEADER + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize);
            let start = buf.as_ptr();
            let had = buf.len();
            let max = blocks.prepare(&mut buf, pending);
            if had > HEADER && buf.as_ptr() != start {
                moves += 1;
            }
            assert!(max >= 1 && max <= buf.capacity() - buf.len(), "{max}");
            let n = max.min(wire.len() - at);
            buf.extend_from_slice(&wire[at..at + n]);
            at += n;
            while buf.len() >= HEADER {
                let len = HEADER + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if buf.len() < len {
                    break;
                }
                consume(buf.split_to(len).freeze());
            }
            if n == 0 && buf.len() < HEADER {
                break;
            }
        }
        moves
    }

    #[test]
    fn chunk_frames_of_the_usual_size_are_never_moved() {
        let mut blocks = RecvBlocks::default();
        // 1 MiB chunks with control frames in between.
        let frames: Vec<usize> = (0..60)
            .map(|i| {
                if i % 3 == 0 {
                    40
                } else {
                    HEADER + 24 + (1 << 20)
                }
            })
            .collect();
        let mut got = Vec::new();
        let moves = play(&mut blocks, &frames, |f| got.push(f.len()));
        assert_eq!(got, frames);
        assert_eq!(moves, 0);
    }

    #[test]
    fn a_frame_larger_than_room_moves_once_and_arrives_whole() {
        let mut blocks = RecvBlocks::default();
        let frames = [100, 3 << 20, 100, 9 << 20, 100];
        let mut got = Vec::new();
        let moves = play(&mut blocks, &frames, |f| got.push(f.len()));
        assert_eq!(got, frames);
        assert!(moves <= 2, "{moves}");
    }

    #[test]
    fn blocks_come_back_once_their_chunks_are_dropped() {
        let mut blocks = RecvBlocks::default();
        let frames = vec![HEADER + (1 << 20); 100];
        // A consumer that drops each chunk at once: a handful of blocks serve 100 MiB.
        play(&mut blocks, &frames, drop);
        assert!(blocks.allocated() <= 3, "{}", blocks.allocated());
    }

    #[test]
    fn an_idle_connection_lets_its_retired_blocks_go() {
        let mut blocks = RecvBlocks::default();
        let frames = vec![HEADER + (1 << 20); 40];
        // Each play starts from an empty buffer, so its last block is dropped, not retired:
        // a warm connection allocates one block per play, the rest are reused.
        play(&mut blocks, &frames, drop);
        play(&mut blocks, &frames, drop);
        let warm = blocks.allocated();
        play(&mut blocks, &frames, drop);
        assert_eq!(
            blocks.allocated() - warm,
            1,
            "a busy connection reuses its blocks"
        );
        blocks.release_idle();
        let released = blocks.allocated();
        play(&mut blocks, &frames, drop);
        assert!(
            blocks.allocated() - released > 1,
            "released blocks are not kept"
        );
    }

    #[test]
    fn blocks_held_by_chunks_are_not_reused() {
        let mut blocks = RecvBlocks::default();
        let frames: Vec<usize> = (0..64).map(|i| HEADER + (1 << 20) + i).collect();
        let mut held = Vec::new();
        play(&mut blocks, &frames, |f| held.push(f));
        // Every chunk still reads what was written into it: no block was written over.
        for (i, chunk) in held.iter().enumerate() {
            assert!(chunk[HEADER..].iter().all(|&b| b == i as u8), "chunk {i}");
        }
        // Each block holds about BLOCK / chunk of them.
        let per_block = (BLOCK / (1 << 20)) as u64;
        assert!(
            blocks.allocated() >= 64 / per_block,
            "{}",
            blocks.allocated()
        );
        let after = blocks.allocated();
        drop(held);
        play(&mut blocks, &frames, drop);
        assert_eq!(blocks.allocated(), after, "released blocks are taken again");
    }
}
