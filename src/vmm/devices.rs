//! Legacy devices on port I/O: the 16550 serial console on 0x3f8 (IRQ 4 via
//! irqfd), the i8042 controller on 0x60/0x64 (guest reset ends the VM), and
//! the debug-exit port 0xf4 (the test guest's exit code). Owns the console
//! output sinks and the device state that snapshots carry.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Serial port base.
pub const COM1: u16 = 0x3f8;
/// IRQ line of the serial port.
pub const COM1_IRQ: u32 = 4;

/// Errors of device setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The console file can't be created.
    #[error("cannot open console file {path}")]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd couldn't be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Saved serial state is invalid.
    #[error("saved serial state is invalid: {0}")]
    SerialState(String),
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default)]
pub enum Console {
    /// Discard it.
    #[default]
    Sink,
    /// This process's stdout.
    Stdout,
    /// Append to a file.
    File(PathBuf),
    /// An in-memory buffer the caller can read.
    Buffer(ConsoleBuffer),
}

/// A shared in-memory console.
#[derive(Debug, Clone, Default)]
pub struct ConsoleBuffer(Arc<Mutex<Vec<u8>>>);

impl ConsoleBuffer {
    /// New, empty.
    pub fn new() -> Self {
        Self::default()
    }
    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for ConsoleBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn writer(&self) -> Result<Box<dyn Write + Send>, Error> {
        Ok(match self {
            Console::Sink => Box::new(std::io::sink()),
            Console::Stdout => Box::new(std::io::stdout()),
            Console::File(p) => Box::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| Error::ConsoleFile {
                        path: p.clone(),
                        source,
                    })?,
            ),
            Console::Buffer(b) => Box::new(b.clone()),
        })
    }
}

/// Serial interrupt: an eventfd registered as an irqfd for IRQ 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// i8042 reset request: a flag the vCPU checks after the write.
#[derive(Clone, Default)]
pub struct ResetFlag(Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// What a port write asked of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing special.
    None,
    /// The guest reset itself through the i8042 (Linux `reboot=k`).
    Reset,
    /// The guest wrote its exit code to the debug-exit port.
    Exit(u8),
}

/// Device state saved in snapshots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesState {
    /// 16550 registers and receive FIFO.
    pub serial: SerialRegs,
}

/// Serializable copy of vm-superio's `SerialState`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The port-I/O devices of one VM.
pub struct Devices {
    serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    i8042: I8042Device<ResetFlag>,
    reset: ResetFlag,
}

impl Devices {
    /// Creates the devices; `state` restores the serial port's registers.
    pub fn new(console: &Console, state: Option<&DevicesState>) -> Result<Devices, Error> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let out = console.writer()?;
        let serial = match state {
            None => Serial::new(IrqTrigger(evt), out),
            Some(s) => {
                let r = &s.serial;
                let st = SerialState {
                    baud_divisor_low: r.baud_divisor_low,
                    baud_divisor_high: r.baud_divisor_high,
                    interrupt_enable: r.interrupt_enable,
                    interrupt_identification: r.interrupt_identification,
                    line_control: r.line_control,
                    line_status: r.line_status,
                    modem_control: r.modem_control,
                    modem_status: r.modem_status,
                    scratch: r.scratch,
                    in_buffer: r.in_buffer.clone(),
                };
                Serial::from_state(&st, IrqTrigger(evt), NoEvents, out)
                    .map_err(|e| Error::SerialState(format!("{e:?}")))?
            }
        };
        let reset = ResetFlag::default();
        Ok(Devices {
            serial,
            i8042: I8042Device::new(reset.clone()),
            reset,
        })
    }

    /// The serial interrupt eventfd, to register as an irqfd.
    pub fn serial_irq(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// The state to put in a snapshot.
    pub fn save(&self) -> DevicesState {
        let s = self.serial.state();
        DevicesState {
            serial: SerialRegs {
                baud_divisor_low: s.baud_divisor_low,
                baud_divisor_high: s.baud_divisor_high,
                interrupt_enable: s.interrupt_enable,
                interrupt_identification: s.interrupt_identification,
                line_control: s.line_control,
                line_status: s.line_status,
                modem_control: s.modem_control,
                modem_status: s.modem_status,
                scratch: s.scratch,
                in_buffer: s.in_buffer,
            },
        }
    }

    /// Flushes console output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }

    /// Port read; ports with no device read as all ones.
    pub fn pio_in(&mut self, port: u16, data: &mut [u8]) {
        let v = match port {
            COM1..=0x3ff => self.serial.read((port - COM1) as u8),
            0x60 | 0x64 => self.i8042.read((port - 0x60) as u8),
            _ => {
                data.fill(0xff);
                return;
            }
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    /// Port write; says whether the VM must end.
    pub fn pio_out(&mut self, port: u16, data: &[u8]) -> IoAction {
        let Some(&v) = data.first() else {
            return IoAction::None;
        };
        match port {
            COM1..=0x3ff => {
                // An interrupt that can't be signalled is not the guest's fault;
                // output still goes out.
                let _ = self.serial.write((port - COM1) as u8, v);
                IoAction::None
            }
            0x60 | 0x64 => {
                let _ = self.i8042.write((port - 0x60) as u8, v);
                if self.reset.0.swap(false, Ordering::SeqCst) {
                    IoAction::Reset
                } else {
                    IoAction::None
                }
            }
            crate::guest::EXIT_PORT => IoAction::Exit(v),
            _ => IoAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_output_reaches_the_console_and_state_round_trips() {
        let buf = ConsoleBuffer::new();
        let mut d = Devices::new(&Console::Buffer(buf.clone()), None).unwrap();
        for b in b"hi\n" {
            assert_eq!(d.pio_out(COM1, &[*b]), IoAction::None);
        }
        d.pio_out(COM1 + 7, &[0x5a]); // scratch register
        assert_eq!(buf.text(), "hi\n");
        let st = d.save();
        let mut d2 = Devices::new(&Console::Sink, Some(&st)).unwrap();
        let mut v = [0u8];
        d2.pio_in(COM1 + 7, &mut v);
        assert_eq!(v[0], 0x5a);
    }

    #[test]
    fn i8042_reset_and_exit_port_end_the_vm() {
        let mut d = Devices::new(&Console::Sink, None).unwrap();
        assert_eq!(d.pio_out(0x64, &[0xfe]), IoAction::Reset);
        assert_eq!(d.pio_out(0xf4, &[3]), IoAction::Exit(3));
        let mut v = [0u8; 2];
        d.pio_in(0x80, &mut v);
        assert_eq!(v, [0xff, 0xff]);
    }
}
