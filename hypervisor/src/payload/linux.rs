//! Linux direct boot through linux-loader: a vmlinux (ELF) or bzImage loaded at 1 MiB,
//! the zero page (`boot_params`) with the e820 map, command line and initrd, entered in
//! 64-bit mode with `rsi` pointing at the zero page (the 64-bit boot protocol).
//!
//! On this machine (PVM-based KVM, ~1 µs per guest instruction) Linux does not boot to
//! init in reasonable time. Measured with Debian's 6.1 kernel: a bzImage's decompressor
//! prints its first line within seconds but would need over an hour to decompress; a
//! vmlinux prints its boot log from `start_kernel` after about 20 s.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, EBDA_END, HIMEM_START, MPTABLE_ADDR, ZERO_PAGE_ADDR,
};
use crate::vstate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xAA55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xFF;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Where the boot stack pointer starts (below the zero page).
const BOOT_STACK: u64 = 0x8FF0;
/// The 64-bit entry point's offset from a bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;

/// Why Linux could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// The kernel file cannot be opened.
    #[error("Cannot open the kernel {}: {source}", .path.display())]
    OpenKernel {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("{} is not a Linux kernel (not an ELF vmlinux: {elf}; not a bzImage: {bzimage})", .path.display())]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// Why ELF loading failed.
        elf: linux_loader::loader::Error,
        /// Why bzImage loading failed.
        bzimage: linux_loader::loader::Error,
    },
    /// The initrd cannot be opened or read.
    #[error("Cannot read the initrd {}: {source}", .path.display())]
    ReadInitrd {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Guest memory ends before the memory the kernel needs at boot.
    #[error("The kernel {} needs guest memory up to {needed:#x} (its image and decompression buffer); the guest's low memory ends at {end:#x}", .path.display())]
    MemoryTooSmall {
        /// The file.
        path: PathBuf,
        /// Where the kernel's boot memory ends.
        needed: u64,
        /// Where the guest's memory below 4 GiB ends.
        end: u64,
    },
    /// The initrd does not fit in guest memory above the kernel.
    #[error("The initrd {} ({size} bytes) does not fit in guest memory ({room} bytes free above the kernel)", .path.display())]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The room there is.
        room: u64,
    },
    /// The command line is too long or has invalid characters.
    #[error("Invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing into guest memory failed.
    #[error("Cannot write the boot data into guest memory: {0}")]
    Write(String),
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// The 64-bit entry point.
    pub rip: u64,
    /// The boot stack.
    pub rsp: u64,
    /// The zero page (`rsi` at entry).
    pub rsi: u64,
}

/// Loads `kernel` (and `initrd`) into `mem` and writes the zero page.
///
/// # Errors
/// [`LinuxError`] naming the failing step: a missing file, a file that is not a kernel,
/// an initrd larger than the memory left.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxEntry, LinuxError> {
    let open = |path: &Path| {
        File::open(path).map_err(|source| LinuxError::OpenKernel {
            path: path.to_owned(),
            source,
        })
    };
    let mut file = open(kernel)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let low_end = crate::vstate::memory::low_end(mem);
    let (result, rip) = match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let rip = r.kernel_load.0;
            (r, rip)
        }
        Err(elf) => {
            let mut file = open(kernel)?;
            match BzImage::load(mem, None, &mut file, himem) {
                Ok(r) => {
                    let rip = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY;
                    (r, rip)
                }
                Err(bzimage) => {
                    return Err(LinuxError::NotAKernel {
                        path: kernel.to_owned(),
                        elf,
                        bzimage,
                    })
                }
            }
        }
    };

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    let kernel_end = boot_memory_end(result.kernel_load.0, result.kernel_end, &params.hdr);
    if kernel_end > low_end {
        return Err(LinuxError::MemoryTooSmall {
            path: kernel.to_owned(),
            needed: kernel_end,
            end: low_end,
        });
    }

    let mut line = Cmdline::new(CMDLINE_MAX).map_err(LinuxError::Cmdline)?;
    line.insert_str(cmdline).map_err(LinuxError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|e| LinuxError::Write(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, kernel_end, low_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![
        (0, MPTABLE_ADDR, E820_RAM),
        (MPTABLE_ADDR, EBDA_END - MPTABLE_ADDR, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    for region in mem.iter().skip(1) {
        e820.push((region.start_addr().0, region.len(), E820_RAM));
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| LinuxError::Write(e.to_string()))?;
    Ok(LinuxEntry {
        rip,
        rsp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
    })
}

/// Where the memory the kernel uses at boot ends. For a bzImage (boot protocol 2.10 and
/// later) that is its decompression buffer: `init_size` bytes from where the
/// decompressor relocates itself, the load address aligned up to `kernel_alignment` but
/// not below `pref_address` (what `startup_64` in `arch/x86/boot/compressed/head_64.S`
/// computes). An initrd placed there would be overwritten during decompression.
fn boot_memory_end(load: u64, image_end: u64, hdr: &setup_header) -> u64 {
    if hdr.version < 0x020a || hdr.init_size == 0 {
        return image_end;
    }
    let align = u64::from(hdr.kernel_alignment).max(1);
    let start = load.next_multiple_of(align).max(hdr.pref_address);
    image_end.max(start + u64::from(hdr.init_size))
}

/// Places the initrd page-aligned at the top of low memory, above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    low_end: u64,
) -> Result<(u64, u64), LinuxError> {
    let read_err = |source| LinuxError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let room = low_end.saturating_sub(kernel_end.next_multiple_of(4096));
    if size > room {
        return Err(LinuxError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            room,
        });
    }
    let addr = (low_end - size) & !0xFFF;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LinuxError::Write(e.to_string()))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;

    fn memory(size: u64) -> GuestMemory {
        crate::vstate::memory::create(&MemoryConfig::anonymous(size)).unwrap()
    }

    #[test]
    fn missing_and_non_kernel_files_are_refused() {
        let mem = memory(16 << 20);
        let msg = load(&mem, Path::new("/nonexistent/vmlinuz"), None, "")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("Cannot open the kernel /nonexistent/vmlinuz"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let msg = load(&mem, &junk, None, "").unwrap_err().to_string();
        assert!(msg.contains("is not a Linux kernel"), "{msg}");
    }

    /// A bzImage with only a setup header (protocol 2.15) and `init_size` bytes of
    /// decompression buffer from 16 MiB.
    fn fake_bzimage(dir: &Path, init_size: u32) -> PathBuf {
        let mut image = vec![0u8; 8192];
        image[0x1F1] = 1; // setup_sects
        image[0x1FE..0x200].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        image[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        let path = dir.join("bzImage");
        std::fs::write(&path, image).unwrap();
        path
    }

    #[test]
    fn a_bzimage_gets_room_for_its_decompression_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory(16 << 20);
        // 16 MiB + 8 MiB of buffer does not fit in 16 MiB of memory.
        let kernel = fake_bzimage(dir.path(), 8 << 20);
        let msg = load(&mem, &kernel, None, "").unwrap_err().to_string();
        assert!(msg.contains("needs guest memory up to 0x1800000"), "{msg}");
        assert!(msg.contains("low memory ends at 0x1000000"), "{msg}");
        // An initrd goes above the buffer, not into it: with 4 MiB of buffer in 32 MiB
        // there are 12 MiB left.
        let mem = memory(32 << 20);
        let kernel = fake_bzimage(dir.path(), 4 << 20);
        let initrd = dir.path().join("initrd");
        File::create(&initrd).unwrap().set_len(13 << 20).unwrap();
        let msg = load(&mem, &kernel, Some(&initrd), "")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("(12582912 bytes free above the kernel)"),
            "{msg}"
        );
        File::create(&initrd).unwrap().set_len(12 << 20).unwrap();
        let entry = load(&mem, &kernel, Some(&initrd), "").unwrap();
        assert_eq!(entry.rip, 0x10_0200);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.hdr.ramdisk_image }, 20 << 20);
        assert_eq!({ params.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let mem = memory(16 << 20);
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("initrd");
        let f = File::create(&big).unwrap();
        f.set_len(32 << 20).unwrap();
        let msg = load_initrd(&mem, &big, 2 << 20, 16 << 20)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("does not fit in guest memory"), "{msg}");
        let small = dir.path().join("small");
        std::fs::write(&small, b"initrd!").unwrap();
        let (addr, size) = load_initrd(&mem, &small, 2 << 20, 16 << 20).unwrap();
        assert_eq!((addr, size), ((16 << 20) - 4096, 7));
        let mut buf = [0u8; 7];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert_eq!(&buf, b"initrd!");
    }
}
